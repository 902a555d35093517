"""Ring attention (backbones/ring.py) equals full causal attention: outputs and gradients of
q, k, v (max abs error <= 1e-5, fp32), at 1 rank (no process group) and at 2 and 4 ranks,
contiguous and zigzag layouts (and bidirectional attention), multi-head, grouped-query and
multi-query heads.

One spawn of 4 gloo processes serves every multi-rank test (starting processes is the slow
part): the 4-rank ring is the default group, the 2-rank ring a sub-group of global ranks 2
and 3 (so group ranks differ from global ones). Workers write safetensors; the parent compares
with ``F.scaled_dot_product_attention(..., is_causal=True)`` on the whole sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from worldloom.backbones import ring
from worldloom.backbones.transformer import apply_rope, rope_table
from worldloom.errors import ConfigError
from worldloom.spawn import spawn_gloo

TOL = 1e-5
# (B, H, KV, T, D): multi-head, grouped-query (2 query heads per kv head), multi-query
CASES = {"mha": (2, 2, 2, 32, 8), "gqa": (2, 4, 2, 64, 8), "mqa": (2, 2, 1, 32, 8)}
MASKS = (*ring.LAYOUTS, "bidirectional")  # the causal mask in each layout, or none (contiguous layout)
RUNS = [(case, mask) for mask in MASKS for case in CASES]


def _inputs(case: str):
    """Fixed fp32 q, k, v and an upstream gradient for the whole sequence (same in every process)."""
    B, H, KV, T, D = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, KV, KV))
    return q, k, v, torch.randn(B, H, T, D, generator=g)


def _reference(case: str, causal: bool = True):
    """Full SDPA on the whole sequence: output and the gradients of q, k, v."""
    q, k, v, up = _inputs(case)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)
    y.backward(up)
    return {"out": y.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _ring_case(case: str, group=None, mask: str = "contiguous") -> dict:
    """This process's share of the inputs through ring attention (``mask``: a layout's causal
    mask, or bidirectional): its output and gradients, put back in sequence order on every rank."""
    causal, layout = mask != "bidirectional", mask if mask in ring.LAYOUTS else "contiguous"
    q, k, v, up = (ring.split_sequence(t, group, dim=2, layout=layout).clone() for t in _inputs(case))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    y = ring.ring_attention(q, k, v, group, layout=layout, causal=causal)
    y.backward(up)
    got = {"out": y.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {n: ring.gather_sequence(t, group, dim=2, layout=layout) for n, t in got.items()}


def _save(tensors: dict, path: str) -> None:
    save_file({n: t.contiguous() for n, t in tensors.items()}, path)


def _layer(x: torch.Tensor, up: torch.Tensor, positions: torch.Tensor, attend) -> dict:
    """A grouped-query attention layer with rotary at ``positions`` (the project's rope), fixed
    weights: its output and the gradients of its two projections for the loss sum(y * up)."""
    g = torch.Generator().manual_seed(7)
    B, T, C = x.shape
    H, KV, D = 4, 2, 8
    qkv = torch.nn.Linear(C, (H + 2 * KV) * D, bias=False)
    proj = torch.nn.Linear(H * D, C, bias=False)
    for lin in (qkv, proj):
        lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.3
    cos, sin = rope_table(D, 64, 10000.0)
    h = qkv(x).view(B, T, H + 2 * KV, D).transpose(1, 2)  # (B, H+2KV, T, D)
    qk = apply_rope(h[:, : H + KV], cos[positions], sin[positions])
    y = proj(attend(qk[:, :H], qk[:, H:], h[:, H + KV :]).transpose(1, 2).reshape(B, T, H * D))
    (y * up).sum().backward()
    return {"y": y.detach(), "qkv": qkv.weight.grad, "proj": proj.weight.grad}


def _layer_inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 32, 16, generator=g), torch.randn(2, 32, 16, generator=g)


def _full_layer() -> dict:
    x, up = _layer_inputs()
    return _layer(x, up, torch.arange(x.shape[1]), lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True))


def _ring_layer(layout: str) -> dict:
    """What the attention layer does under ring attention: split the tokens, rotary at their
    global positions, ring attention; outputs gathered, weight gradients SUMMED over ranks."""
    x, up = (ring.split_sequence(t, layout=layout) for t in _layer_inputs())
    pos = ring.local_positions(x.shape[1], layout=layout)
    got = _layer(x, up, pos, lambda q, k, v: ring.ring_attention(q, k, v, layout=layout))
    for name in ("qkv", "proj"):
        dist.all_reduce(got[name])  # SUM: each rank's loss covers only its tokens
    return {**got, "y": ring.gather_sequence(got["y"], layout=layout)}


def _worker(rank: int, world: int, folder: str) -> None:
    """Every case on the whole group (4 ranks), then on the sub-group of global ranks 2, 3
    (a 2-rank ring whose members are not ranks 0, 1), then the split helpers."""
    for case, mask in RUNS:
        _save(_ring_case(case, None, mask), f"{folder}/{case}-{mask}-w4-{rank}.safetensors")
    pair = dist.new_group([2, 3])  # every rank must take part in creating it
    if rank in (2, 3):
        for case, mask in RUNS:
            _save(_ring_case(case, pair, mask), f"{folder}/{case}-{mask}-w2-{rank - 2}.safetensors")
    for layout in ring.LAYOUTS:
        _save(_ring_layer(layout), f"{folder}/layer-{layout}-{rank}.safetensors")
    x = torch.arange(2 * 16 * 3).view(2, 16, 3)  # (B, T, C)
    for layout in ring.LAYOUTS:
        local = ring.split_sequence(x, layout=layout)
        _save({"local": local, "pos": ring.local_positions(local.shape[1], layout=layout),
               "gathered": ring.gather_sequence(local, layout=layout)}, f"{folder}/split-{layout}-{rank}.safetensors")
    try:
        ring.split_sequence(torch.zeros(1, 9))  # 9 tokens do not split over 4 ranks
    except ConfigError as e:
        Path(folder, f"refused-{rank}.txt").write_text(str(e))
    if rank in (0, 1):
        try:
            ring.ring_attention(*_inputs("mha")[:3], pair)
        except ConfigError as e:
            Path(folder, f"outsider-{rank}.txt").write_text(str(e))


def _assert_close(got: dict, want: dict, label: str, relative: tuple[str, ...] = ()) -> None:
    """Max abs error <= TOL; for the names in ``relative`` (sums over many tokens, of size
    ~30) TOL times the reference's largest magnitude."""
    for name, ref in want.items():
        assert got[name].shape == ref.shape, (label, name)
        err = (got[name] - ref).abs().max().item()
        tol = TOL * max(1.0, ref.abs().max().item()) if name in relative else TOL
        assert err <= tol, f"{label} {name}: max abs error {err:.2e} > {tol:.2e}"


def test_one_rank_is_plain_causal_attention():
    for case, mask in RUNS:
        _assert_close(_ring_case(case, mask=mask), _reference(case, mask != "bidirectional"), f"{case} {mask}")


def test_fp32_inside_under_autocast():
    """bf16 autocast around the layer does not turn the blockwise matmuls into bf16 ones."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _ring_case("gqa")
    assert all(t.dtype == torch.float32 for t in got.values())
    _assert_close(got, _reference("gqa"), "gqa under autocast")


def test_one_rank_tiled_blocks(monkeypatch):
    """Query tiles much smaller than a block (the long-context path) give the same numbers."""
    monkeypatch.setattr(ring, "TILE_ELEMS", 64)
    _assert_close(_ring_case("gqa"), _reference("gqa"), "gqa tiled")


@pytest.fixture(scope="module")
def ring_runs(tmp_path_factory):
    """One spawn of 4 gloo processes (the slow part: each imports torch) for every test below."""
    folder = tmp_path_factory.mktemp("ring")
    spawn_gloo(_worker, 4, str(folder), timeout_s=60)
    return folder


@pytest.mark.parametrize("world", [2, 4])
def test_ring_equals_full_attention(ring_runs, world):
    for case, mask in RUNS:
        want = _reference(case, causal=mask != "bidirectional")
        for r in range(world):  # every rank gathered the whole sequence back
            got = load_file(ring_runs / f"{case}-{mask}-w{world}-{r}.safetensors")
            _assert_close(got, want, f"{case} {mask} on {world} ranks, rank {r}")


def test_attention_layer_with_rotary_on_four_ranks(ring_runs):
    """The contract an attention layer follows (split, rotary at local_positions, ring
    attention, gradients summed over ranks) reproduces the whole-sequence layer."""
    want = _full_layer()
    for layout in ring.LAYOUTS:
        for r in range(4):
            got = load_file(ring_runs / f"layer-{layout}-{r}.safetensors")
            _assert_close(got, want, f"layer {layout} rank {r}", relative=("qkv", "proj"))


def test_split_gather_positions_on_four_ranks(ring_runs):
    x = torch.arange(2 * 16 * 3).view(2, 16, 3)
    for r in range(4):
        positions = {"contiguous": list(range(4 * r, 4 * r + 4)),  # rotary offset rank * T_local
                     "zigzag": [2 * r, 2 * r + 1, 14 - 2 * r, 15 - 2 * r]}  # chunks r and 7 - r of 2 tokens
        for layout, pos in positions.items():
            split = load_file(ring_runs / f"split-{layout}-{r}.safetensors")
            assert torch.equal(split["local"], x[:, pos]), (layout, r)
            assert split["pos"].tolist() == pos, (layout, r)
            assert torch.equal(split["gathered"], x), (layout, r)
        assert (ring_runs / f"refused-{r}.txt").read_text().startswith("a sequence of 9 tokens does not split")
    for r in (0, 1):
        assert "not a member" in (ring_runs / f"outsider-{r}.txt").read_text()


def test_split_positions_and_refusals():
    x = torch.arange(12).view(1, 12)
    assert torch.equal(ring.split_sequence(x), x)  # one rank: the whole sequence
    assert torch.equal(ring.local_positions(5), torch.arange(5))
    assert ring.check_split(64, 4) == 16
    with pytest.raises(ConfigError, match="multiple of 4"):
        ring.check_split(30, 4)
    with pytest.raises(ConfigError, match="does not split evenly"):
        ring.check_split(2, 4)
    q = torch.zeros(1, 3, 8, 4)
    with pytest.raises(ConfigError, match="KV must divide H"):
        ring.ring_attention(q, torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4))
    with pytest.raises(ConfigError, match="do not match"):
        ring.ring_attention(q, torch.zeros(1, 3, 6, 4), torch.zeros(1, 3, 6, 4))
    with pytest.raises(ConfigError, match=r"\(B, H, T, D\)"):
        ring.ring_attention(q[0], q[0], q[0])
    with pytest.raises(ConfigError, match="multiple of 8"):
        ring.check_split(36, 4, layout="zigzag")  # 2 chunks per rank
    with pytest.raises(ConfigError, match="multiple of 2 tokens per rank, got 7"):
        ring.ring_attention(*(torch.zeros(1, 2, 7, 4) for _ in range(3)), layout="zigzag")
    with pytest.raises(ConfigError, match="multiple of 2 tokens per rank, got 5"):
        ring.local_positions(5, layout="zigzag")
    assert ring.local_positions(6, layout="zigzag").tolist() == list(range(6))  # one rank: chunks 0 and 1
    with pytest.raises(ConfigError, match="unknown ring attention layout 'spiral'"):
        ring.ring_attention(q, q, q, layout="spiral")
