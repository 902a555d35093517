"""Medusa (worldloom.adapters.medusa, inference.medusa, recipe medusa): a tree forward equals each of its
paths fed alone, compaction keeps a row's path, greedy output token-for-token the plain one for every
backbone (tree for attention-only stacks, chain otherwise; batched, left-padded, past the context),
typical acceptance, one-line errors, and `tune medusa` end to end on a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from test_backbones import CASES, CTX, V, make_model
from test_speculative import prompts, run, spec_model
from worldloom.adapters.medusa import NoHeadsError, attach_heads
from worldloom.checkpoint import latest_checkpoint
from worldloom.cli import main
from worldloom.decode import SamplingConfig
from worldloom.errors import ConfigError
from worldloom.inference.medusa import Tree, medusa_ids
from worldloom.inference.speculative import SpecStats
from worldloom.inference.verify import compact
from worldloom.io import load_tensors

CHOICES = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)]


def with_heads(model, heads: int = 3, scale: float = 0.5, seed: int = 1):
    """Random heads (not the identity they start as): many of their guesses are refused."""
    attach_heads(model, heads)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.medusa.parameters():
            p.normal_(0.0, scale, generator=g)
    return model


def medusa_run(model, ps, n, stats=None, **kw):
    sc = SamplingConfig(max_new_tokens=n, temperature=kw.pop("temperature", 0.0), seed=kw.pop("seed", None))
    return torch.stack(list(medusa_ids(model, ps, sc, stats=stats, **kw)), 1)  # (B, n)


# ---------------------------------------------------------------- the tree pass and compaction


def tree_pass(model, tree: Tree, seed: int = 0):
    """A left-padded batch of 2: a prefix in the cache, then the root and the tree's nodes in one pass."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, V, (2, 6), generator=g)
    pad = torch.tensor([2, 0])
    nodes = torch.randint(0, V, (2, 1 + tree.nodes), generator=g)  # root + nodes
    cache = model.new_cache(2, CTX, pad)
    model(prefix, cache)
    out = model(nodes, cache, tree=tree.inputs(1 + tree.nodes))
    return prefix, pad, nodes, cache, out.logits


def path_of(tree: Tree, nodes: torch.Tensor, i: int) -> torch.Tensor:
    """The tokens (B, depth + 1) from the root to node i."""
    return nodes[:, tree.anc[i, : int(tree.depth[i]) + 1]]


@pytest.mark.parametrize("case", ["transformer", "transformer-moe"])
def test_tree_forward_equals_each_path_alone(case):
    model = make_model("transformer", ffn="moe") if case == "transformer-moe" else make_model(case)
    tree = Tree.build(CHOICES, 3)
    with torch.no_grad():
        prefix, pad, nodes, _, logits = tree_pass(model, tree)
        for i in range(tree.nodes + 1):
            fresh = model.new_cache(2, CTX, pad)
            want = model(torch.cat([prefix, path_of(tree, nodes, i)], 1), fresh).logits[:, -1]
            torch.testing.assert_close(logits[:, i], want, atol=1e-5, rtol=0, msg=f"node {i}")


def test_compact_keeps_each_rows_path():
    """Row 0 keeps node (0, 1) (index 5), row 1 node (1, 0) (index 6): after compaction, one more token
    gives the logits of prefix + root + that row's path + the token, fed plainly."""
    model = make_model("transformer")
    tree = Tree.build(CHOICES, 3)
    with torch.no_grad():
        prefix, pad, nodes, cache, _ = tree_pass(model, tree, seed=1)
        keep = torch.tensor([5, 6])
        assert tree.choices[4] == (0, 1) and tree.choices[5] == (1, 0)
        root = cache.length - tree.nodes - 1
        compact(cache, root + 1, root + tree.anc[keep][:, 1:3])
        assert cache.length == 6 + 1 + 2
        nxt = torch.tensor([[3], [4]])
        got = model(nxt, cache).logits[:, -1]
        for b in range(2):
            path = torch.cat([prefix, path_of(tree, nodes, int(keep[b]))], 1)[b : b + 1]
            want = model(torch.cat([path, nxt[b : b + 1]], 1), model.new_cache(1, CTX, pad[b : b + 1])).logits[:, -1]
            torch.testing.assert_close(got[b], want[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- greedy output == plain, every backbone


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_plain(case):
    """Random heads on a random model (most guesses refused) and on a tied model that repeats its input
    (most accepted: several tokens per pass, rows kept at the batch's minimum, caches compacted)."""
    stats = SpecStats()
    for model in (with_heads(spec_model(case)), with_heads(make_model(case), scale=0.3)):
        for ps in (prompts(), prompts(lengths=(6,))):
            assert torch.equal(medusa_run(model, ps, 16, stats), run(model, ps, 16))
    assert 0 < stats.accepted < stats.drafted
    assert stats.forwards < 4 * 16  # some passes emitted several tokens
    if case == "transformer":
        assert stats.drafted > 4 * stats.verifications * 3  # a tree (more nodes than heads), not a chain


def test_past_the_context_and_a_prompt_longer_than_it():
    for model in (with_heads(spec_model("transformer")), with_heads(make_model("hybrid"), scale=0.3)):
        ps = [list(range(V))[: CTX - 1] + list(range(10)), [5, 6]]  # CTX + 9 tokens, and 2
        assert torch.equal(medusa_run(model, ps, 2 * CTX + 5), run(model, ps, 2 * CTX + 5))


def test_typical_acceptance_at_a_tiny_temperature_is_greedy():
    """A near one-hot distribution: typical acceptance takes the argmax path and samples the argmax."""
    for case in ("transformer", "hybrid"):
        model = with_heads(make_model(case), scale=0.3)
        stats = SpecStats()
        got = medusa_run(model, prompts(), 16, stats, temperature=1e-4, seed=0, typical=True)
        assert torch.equal(got, run(model, prompts(), 16))
        assert stats.accepted > 0


def test_sampling_is_reproducible_with_a_seed():
    model = with_heads(spec_model("transformer"))
    for typical in (False, True):
        a = medusa_run(model, prompts(), 12, temperature=1.0, seed=4, typical=typical)
        assert torch.equal(a, medusa_run(model, prompts(), 12, temperature=1.0, seed=4, typical=typical))
        assert not torch.equal(a, medusa_run(model, prompts(), 12, temperature=1.0, seed=5, typical=typical))


# ---------------------------------------------------------------- one-line errors


def test_errors():
    model = make_model("transformer")
    with pytest.raises(NoHeadsError, match="no Medusa heads.*tune medusa"):
        medusa_run(model, prompts(), 4)
    with pytest.raises(ConfigError, match="from 1 to 16"):
        attach_heads(model, 0)
    with_heads(model, 2)
    with pytest.raises(ValueError, match="3 deep, but the model has 2 Medusa heads"):
        medusa_run(model, prompts(), 4, tree=[(0,), (0, 0), (0, 0, 0)])
    with pytest.raises(ValueError, match="lacks its parent"):
        medusa_run(model, prompts(), 4, tree=[(0,), (1, 0)])
    mamba = make_model("mamba")
    with pytest.raises(ValueError, match="attention-only layers"):
        mamba(torch.zeros(1, 3, dtype=torch.long), tree=Tree.build([(0,), (1,)], 1).inputs(3))


# ---------------------------------------------------------------- the recipe end to end


def test_tune_medusa_end_to_end(trained_run, tmp_path, capsys):
    from worldloom.run import load_run

    args = ["tune", "medusa", str(trained_run), "heads=2", f"out_dir={tmp_path}", "name=med", "medusa.samples=40",
            "medusa.prompt=8", "medusa.length=24", "train.max_steps=30", "train.eval_interval=15", "train.lr=0.01",
            "train.warmup_steps=2", "train.threads=1", "--no-progress"]
    assert main(args) == 0
    run_dir = tmp_path / "med"
    saved = load_tensors(latest_checkpoint(run_dir) / "model.safetensors")
    assert saved and all(k.startswith("medusa.") for k in saved)  # the heads only
    res = json.loads((run_dir / "tune_eval.json").read_text())
    assert len(res["head_accuracy"]) == 2 and min(res["head_accuracy"]) > 3 * res["chance"]
    assert res["tokens_per_forward"] > 1.2  # the heads guess right often enough to skip passes
    assert (run_dir / "distill.safetensors").is_file()
    loaded = load_run(run_dir)
    assert len(loaded.model.medusa) == 2 and loaded.cfg.tune.base_hash
    ids = [loaded.tokenizer.encode(t).tolist() for t in ("The cat", "A dog sat")]
    stats = SpecStats()
    assert torch.equal(medusa_run(loaded.model, ids, 20, stats), run(loaded.model, ids, 20))
    assert stats.accepted > 0
    with pytest.raises(NoHeadsError):  # the base itself has none
        medusa_run(load_run(trained_run).model, ids, 4)
    capsys.readouterr()  # generate --medusa prints the plain greedy text and its acceptance line
    argv = ["generate", str(run_dir), "The cat", "--max-new-tokens", "30", "--temperature", "0"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--medusa"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "mean accepted length" in err
    for extra, needle in ((["--medusa", "--lookup"], "choose one"), (["--medusa", "--compile"], "drop --compile")):
        assert main(argv + extra) == 2 and needle in capsys.readouterr().err
    assert main(["generate", str(trained_run), "The", "--medusa"]) == 2
    err = capsys.readouterr().err
    assert "no Medusa heads" in err and err.count("\n") == 1
    assert main(["tune", "medusa", str(trained_run), "heads=0", f"out_dir={tmp_path}", "name=bad"]) == 2
    assert "medusa.heads must be from 1 to 16" in capsys.readouterr().err


def test_resume_trains_on_the_cached_generations(trained_run, tmp_path, monkeypatch):
    from worldloom.tune.common import tune_recipe
    from worldloom.tune.distill import Generations

    quiet = {"progress": False, "log": lambda *a: None}
    tiny = ["heads=1", f"out_dir={tmp_path}", "name=m", "medusa.samples=8", "medusa.prompt=4", "medusa.length=8",
            "train.max_steps=2", "train.eval_interval=2", "train.threads=1"]
    tune_recipe("medusa", trained_run, tiny, **quiet)
    before = load_tensors(tmp_path / "m" / "distill.safetensors")

    def no(*a):
        raise AssertionError("generated again on resume")

    monkeypatch.setattr(Generations, "generate", no)
    s = tune_recipe("medusa", None, ["train.max_steps=4"], resume=tmp_path / "m", **quiet)
    assert s["step"] == 4 and len(s["head_accuracy"]) == 1
    assert torch.equal(load_tensors(tmp_path / "m" / "distill.safetensors")["train"], before["train"])
    assert before["train"].shape[1] == 4 + 8
