"""Masking for the fill-mask objectives: which tokens a window hides, and the batch that carries them.

The seed chapter's masked loss, ``l_masked = -E_M[sum_{m in M} ln p(x_m | x_{-m})]``, drops the
tokens at the positions M and asks for them back. Here every position of M is replaced by
``<mask>`` (plain masking, the chapter's x_{-m}; not BERT's 80/10/10 mix of mask / random /
unchanged, which serves fine-tuning on unmasked text, a use this project does not have). Each
window hides exactly ``max(1, round(rate * T))`` positions, drawn with the training data's
generator, so a run stays reproducible and resumes bit for bit. The objectives themselves
(``worldloom.losses.masked``) draw nothing.

Batches (``masked_batch``), for windows ``input`` / ``target`` (B, T):

    masked    input (B, T) the masked copy, causal (B,) all False, mask (B, T) bool, mask_target (B, T)
    combined  input (2B, T): the B windows then their masked copies, causal (2B,) True then False,
              target (B, T) next-token targets of the first B rows, mask and mask_target as above

so one call of the model makes both passes of the combined objective (the rows are independent:
the same as two calls, in one forward and one backward).
"""

from __future__ import annotations

import torch


def mask_positions(shape: tuple[int, int], rate: float, gen: torch.Generator) -> torch.Tensor:
    """(B, T) bool with exactly max(1, round(rate * T)) True positions per row, drawn from ``gen``."""
    B, T = shape
    k = max(1, round(rate * T))
    chosen = torch.rand(B, T, generator=gen).topk(k, dim=1).indices  # (B, k)
    return torch.zeros(B, T, dtype=torch.bool).scatter_(1, chosen, True)


def masked_batch(batch: dict, objective: str, rate: float, mask_id: int, gen: torch.Generator) -> dict:
    """The batch of a masked or combined objective from a next-token batch (see the module docstring)."""
    ids = batch["input"]  # (B, T)
    B = ids.shape[0]
    mask = mask_positions(tuple(ids.shape), rate, gen)
    hidden = ids.masked_fill(mask, mask_id)  # (B, T) the masked copy
    out = {"mask": mask, "mask_target": ids}
    if objective == "masked":
        return {**out, "input": hidden, "causal": torch.zeros(B, dtype=torch.bool)}
    if objective == "combined":
        causal = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)])  # (2B,)
        return {**out, "input": torch.cat([ids, hidden]), "causal": causal, "target": batch["target"]}
    raise ValueError(f"no masked batch for objective {objective!r}")
