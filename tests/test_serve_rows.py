"""Joining and compacting cache rows (worldloom.serve.rows): a row decoded in a batch that others join
and leave gives the logits it gives alone, for every kind of layer."""

from __future__ import annotations

import pytest
import torch

from worldloom.config import ModelConfig
from worldloom.model import LWM
from worldloom.serve.rows import compact, join, retention_thetas

KINDS = {
    "transformer": dict(backbone="transformer"),
    "mamba": dict(backbone="mamba"),
    "retnet": dict(backbone="retnet"),
    "hybrid": dict(backbone="hybrid", layers="mamba,attn,retnet"),
}


def _model(kind: str) -> LWM:
    torch.manual_seed(0)
    n_layer = 3 if kind == "hybrid" else 2
    m = LWM(ModelConfig(n_layer=n_layer, d_model=32, n_head=2, context=64, vocab_size=50, **KINDS[kind]))
    with torch.no_grad():  # larger weights than the init, so a wrong position or state shows in the logits
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return m.eval()


def _alone(model, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each fed token, decoding the row alone."""
    cache = model.new_cache(1, model.cfg.context)
    out = [model(torch.tensor([ids]), cache).logits[0, -1]]
    for t in steps:
        out.append(model(torch.tensor([[t]]), cache).logits[0, -1])
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@torch.inference_mode()
def test_joined_rows_decode_as_alone(kind):
    model = _model(kind)
    thetas = retention_thetas(model)
    a_ids, b_ids, c_ids = [1, 2, 3, 4, 5, 6, 7], [9, 8], list(range(10, 22))
    feed = [3, 14, 15, 9, 26, 5, 35, 8]
    ref = {k: _alone(model, ids, feed) for k, ids in (("a", a_ids), ("b", b_ids), ("c", c_ids))}
    batch = model.new_cache(1, model.cfg.context)
    got = {"a": [model(torch.tensor([a_ids]), batch).logits[0, -1]]}
    rows = ["a"]
    for step, t in enumerate(feed):
        if step == 2:  # b joins (shorter than the batch), c joins later (longer than the batch)
            new = model.new_cache(1, model.cfg.context)
            got["b"] = [model(torch.tensor([b_ids]), new).logits[0, -1]]
            batch, rows = join(batch, new, thetas), rows + ["b"]
        if step == 4:
            new = model.new_cache(1, model.cfg.context)
            got["c"] = [model(torch.tensor([c_ids]), new).logits[0, -1]]
            batch, rows = join(batch, new, thetas), rows + ["c"]
        if step == 6:  # c (the longest) leaves: the padding a and b had for it goes away
            keep = [i for i, r in enumerate(rows) if r != "c"]
            before = batch.length
            batch, rows = compact(batch.select(torch.tensor(keep))), [rows[i] for i in keep]
            assert batch.length < before
        lens = {r: len(got[r]) - 1 for r in rows}  # tokens each row has been fed so far
        ids = torch.tensor([[feed[lens[r]]] for r in rows])
        logits = model(ids, batch).logits[:, -1]
        for i, r in enumerate(rows):
            got[r].append(logits[i])
    for r in ("a", "b", "c"):
        n = len(got[r])
        torch.testing.assert_close(torch.stack(got[r]), torch.stack(ref[r][:n]), atol=2e-4, rtol=1e-4)


def test_join_refuses_what_does_not_fit():
    model = _model("transformer")
    a, b = model.new_cache(1, 16), model.new_cache(1, 64)
    with torch.inference_mode():
        model(torch.zeros(1, 4, dtype=torch.long), a)
        model(torch.zeros(1, 20, dtype=torch.long), b)
    with pytest.raises(ValueError, match="more than the cache"):
        join(a, b)
