"""A base run's own generations: the self-distillation data of Medusa heads and of draft models.

    gens = Generations(cfg.medusa, cfg.tune.base_hash, length)     # or cfg.draft
    train, val = gens.cached(run_dir) or gens.generate(base_model, cfg, tokenizer)
    gens.save(run_dir, train, val)
    batch = rows(ids, prompt)                                      # input / target / weight

``samples`` prompts of ``prompt`` tokens are cut at random places of the base's training text (its
``data.path``, the part before its held-out tail) and the base continues each by ``length`` tokens
(greedy by default: the decoding a drafter is meant to speed up), batched, with the KV cache. What
learns from them learns what the base *says*, not what the text says. The last ``val_fraction`` of
the generations is held out. They are kept in the run folder (``distill.safetensors``, then
``distill.json``: what made them, written last so the pair is complete), so ``--resume`` trains
on the same ones; settings or a base that differ make them again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DataError
from ..io import load_tensors, save_tensors, write_json

DISTILL = "distill"  # distill.safetensors (train, val: (N, prompt + length) ids) and distill.json (what made them)
GEN_BATCH = 64  # generations decoded together


class Generations:
    """The generations one set of settings (a `DistillConfig`) asks of the base with hash ``base_hash``."""

    def __init__(self, dc, base_hash: str, length: int):
        self.dc, self.base_hash, self.length = dc, base_hash, length

    def key(self) -> dict:
        dc = self.dc
        return {"base_hash": self.base_hash, "samples": dc.samples, "prompt": dc.prompt, "length": self.length,
                "temperature": dc.temperature, "seed": dc.seed, "val_fraction": dc.val_fraction}

    def cached(self, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(train, val) as saved in ``run_dir`` by the same settings, else None."""
        meta = Path(run_dir) / f"{DISTILL}.json"
        if not meta.is_file() or json.loads(meta.read_text()) != self.key():
            return None
        t = load_tensors(Path(run_dir) / f"{DISTILL}.safetensors", "self-distillation data")
        return t["train"], t["val"]

    def save(self, run_dir: Path, train: torch.Tensor, val: torch.Tensor) -> None:
        save_tensors(Path(run_dir) / f"{DISTILL}.safetensors", {"train": train, "val": val})
        write_json(Path(run_dir) / f"{DISTILL}.json", self.key())  # written last: the pair is complete

    @torch.no_grad()
    def generate(self, model, cfg, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts cut from the base's training text (cfg.data), continued by ``model``: (train, val) (N, P + G) ids.
        A progress bar (with its ETA) on a terminal."""
        from tqdm import tqdm

        from ..decode import SamplingConfig, generate_ids
        from ..recipes.text import prepare_text

        dc = self.dc
        try:
            text = prepare_text(cfg, tokenizer)[0].train
        except DataError as e:
            raise DataError(f"{e} (the prompts are cut from the base's training text: give data.path=FILE)") from None
        if len(text) <= dc.prompt:
            raise DataError(f"{cfg.data.path}: {len(text)} training tokens are too few for prompts of {dc.prompt}")
        g = torch.Generator().manual_seed(dc.seed)
        starts = torch.randint(len(text) - dc.prompt, (dc.samples,), generator=g)
        prompts = torch.stack([text[s : s + dc.prompt] for s in starts.tolist()])  # (N, P)
        was = model.training
        model.eval()
        out = []
        with tqdm(total=dc.samples, desc="generations of the base", unit="row", disable=None, dynamic_ncols=True) as bar:
            for i in range(0, dc.samples, GEN_BATCH):
                p = prompts[i : i + GEN_BATCH]
                sc = SamplingConfig(max_new_tokens=self.length, temperature=dc.temperature, seed=dc.seed + i)
                new = torch.stack(list(generate_ids(model, p.tolist(), sc)), 1).cpu()  # (b, G)
                out.append(torch.cat([p, new.clone()], 1))
                bar.update(len(p))
        model.train(was)
        rows = torch.cat(out)
        n_val = max(1, round(dc.samples * dc.val_fraction))
        return rows[:-n_val], rows[-n_val:]


def rows(ids: torch.Tensor, prompt: int) -> dict:
    """(B, P + G) ids -> input/target (B, P + G - 1) and weight: 1 where the target was generated."""
    w = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    w[:, prompt - 1 :] = 1.0
    return {"input": ids[:, :-1], "target": ids[:, 1:], "weight": w}
