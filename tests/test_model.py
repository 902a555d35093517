"""The model: causality, KV cache == full forward (also with GQA and left padding), gradients, tying."""

from __future__ import annotations

import pytest
import torch

from worldloom.config import ModelConfig, TrainConfig
from worldloom.losses import language_model_loss
from worldloom.model import LWM
from worldloom.checkpoint import load_model_weights, save_checkpoint
from worldloom.train.optim import make_optimizer

V, CTX = 61, 16
ATOL = 1e-5


def make_model(seed: int = 0, **kw) -> LWM:
    args = dict(n_layer=2, n_head=4, d_model=32, context=CTX, vocab_size=V)
    args.update(kw)
    torch.manual_seed(seed)
    model = LWM(ModelConfig(**args))
    with torch.no_grad():  # larger-than-init weights so the logits differ clearly between tokens
        model.embed.weight.normal_(0.0, 1.0)
    return model.eval()


HEADS = {"mha": dict(n_head=4, n_kv_head=0), "gqa": dict(n_head=4, n_kv_head=2), "mqa": dict(n_head=4, n_kv_head=1)}


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("t", [0, 5, CTX - 1])
def test_causal(heads, t):
    model = make_model(**HEADS[heads])
    x = ids(2, CTX)
    y = x.clone()
    y[:, t] = (x[:, t] + 1) % V  # change one token
    with torch.no_grad():
        a = model(x).logits
        b = model(y).logits
    assert a.shape == (2, CTX, V)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3)  # later positions do see the change


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_kv_cache_token_by_token_equals_full_forward(heads):
    model = make_model(**HEADS[heads])
    x = ids(3, CTX)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(3, CTX)
        steps = [model(x[:, i : i + 1], cache).logits for i in range(CTX)]
    assert cache.length == CTX
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_kv_cache_in_chunks_equals_full_forward(heads):
    model = make_model(**HEADS[heads])
    x = ids(2, CTX)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, CTX)
        parts, i = [], 0
        for n in (5, 3, 1, 4, 1, 2):  # a prefill, then several multi-token chunks and single tokens
            parts.append(model(x[:, i : i + n], cache).logits)
            i += n
    assert i == CTX
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_left_padded_batch_matches_rows_alone(heads):
    """A row with p pads at the left computes what the same tokens compute alone."""
    model = make_model(**HEADS[heads])
    lengths = [CTX - 6, 3, CTX - 8]
    rows = [ids(1, n, seed=10 + n)[0] for n in lengths]
    L = max(lengths)
    batch = torch.zeros(len(rows), L, dtype=torch.long)
    pad = torch.tensor([L - n for n in lengths])
    for r, row in enumerate(rows):
        batch[r, L - len(row):] = row
    extra = ids(len(rows), 4, seed=99)  # tokens appended after the prompt, one at a time
    with torch.no_grad():
        cache = model.new_cache(len(rows), CTX, pad)
        prompt_logits = model(batch, cache).logits
        step_logits = [model(extra[:, j : j + 1], cache).logits for j in range(extra.shape[1])]
        for r, row in enumerate(rows):
            alone = model(torch.cat([row, extra[r]])[None]).logits
            n = len(row)
            torch.testing.assert_close(prompt_logits[r, L - n:], alone[0, :n], atol=ATOL, rtol=0)
            torch.testing.assert_close(torch.cat(step_logits, 1)[r], alone[0, n:], atol=ATOL, rtol=0)


def test_context_limits():
    model = make_model()
    with pytest.raises(ValueError, match="context"):
        model(ids(1, CTX + 1))
    with pytest.raises(ValueError, match="context"):
        model.new_cache(1, CTX + 1)
    cache = model.new_cache(1, CTX)
    with torch.no_grad():
        model(ids(1, CTX - 1), cache)
        with pytest.raises(ValueError, match="context"):
            model(ids(1, 2), cache)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_gradients_reach_every_parameter(tie, heads):
    model = make_model(tie_weights=tie, **HEADS[heads]).train()
    x = ids(2, CTX + 1)
    out = language_model_loss(model(x[:, :-1]), {"input": x[:, :-1], "target": x[:, 1:]})
    assert out.total.ndim == 0 and out.parts["loss"] == pytest.approx(out.total.item())
    out.total.backward()
    names = [n for n, _ in model.named_parameters()]
    assert any("qkv" in n for n in names) and any("gate_up" in n for n in names) and any("norm" in n for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_weight_tying_on():
    model = make_model(tie_weights=True)
    untied = make_model(tie_weights=False)
    assert model.head.weight is model.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_params() - model.num_params() == V * 32
    # the shared matrix is listed once, so the optimizer updates it once
    opt = make_optimizer(model, TrainConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with torch.no_grad():
        model.embed.weight[3].add_(1.0)
    assert torch.equal(model.head.weight[3], model.embed.weight[3])


@pytest.mark.parametrize("tie", [True, False])
def test_weights_round_trip_through_checkpoint(tmp_path, tie):
    model = make_model(seed=1, tie_weights=tie)
    if not tie:
        with torch.no_grad():
            model.head.weight.normal_()  # make sure the head is not a copy of the embedding
    ckpt = save_checkpoint(tmp_path, model, None, {"step": 0})
    fresh = make_model(seed=2, tie_weights=tie)
    x = ids(2, CTX)
    with torch.no_grad():
        assert not torch.allclose(fresh(x).logits, model(x).logits)
        load_model_weights(fresh, ckpt)
        assert torch.equal(fresh(x).logits, model(x).logits)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    assert (fresh.head.weight is fresh.embed.weight) == tie


def test_dropout_only_in_training_mode():
    model = make_model(dropout=0.5)
    x = ids(1, CTX)
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)
        model.train()
        assert not torch.equal(model(x).logits, model(x).logits)


def test_vocab_size_must_be_set():
    with pytest.raises(ValueError, match="vocab_size"):
        LWM(ModelConfig(n_layer=1, n_head=2, d_model=16, context=8))
