"""Masked and combined objectives: the loss, the bidirectional pass, training, `worldloom fill`, resume, refusals."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from worldloom.cli import main
from worldloom.config import ModelConfig, TrainConfig, build_config
from worldloom.data.masking import mask_positions, masked_batch
from worldloom.errors import ConfigError
from worldloom.losses import combined_loss, masked_lm_loss, masked_token_loss, next_token_loss
from worldloom.model import LWM, model_inputs
from worldloom.recipes.text import prepare_text
from worldloom.tokenize import TextTokenizer
from worldloom.train import train

from conftest import tiny_config
from test_train_resume import EXACT, N, QUIET, assert_same_run, metrics

V = 23


def tiny_model(seed: int = 0, **kw) -> LWM:
    torch.manual_seed(seed)
    return LWM(ModelConfig(n_layer=2, d_model=32, n_head=4, context=16, vocab_size=V, **kw)).eval()


# ---------------------------------------------------------------- the loss


def test_masked_loss_reads_only_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, V, generator=g)
    target = torch.randint(V, (3, 10), generator=g)
    mask = mask_positions((3, 10), 0.3, g)
    base = masked_token_loss(logits, target, mask)
    (b, t) = (~mask).nonzero()[0].tolist()  # an unmasked position
    t2, l2 = target.clone(), logits.clone()
    t2[b, t] = (t2[b, t] + 1) % V
    l2[b, t] += 5 * torch.randn(V, generator=g)
    assert masked_token_loss(l2, t2, mask) == base  # nothing outside the mask counts
    (b, t) = mask.nonzero()[0].tolist()  # a masked position
    t2 = target.clone()
    t2[b, t] = (t2[b, t] + 1) % V
    assert masked_token_loss(logits, t2, mask) != base
    # the mean cross-entropy over exactly the masked positions
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(3, 10)
    assert torch.allclose(base, nll[mask].mean())


def test_mask_positions_exact_count_and_reproducible():
    m = mask_positions((5, 40), 0.15, torch.Generator().manual_seed(3))
    assert m.sum(1).tolist() == [6] * 5  # round(0.15 * 40) per row
    assert torch.equal(m, mask_positions((5, 40), 0.15, torch.Generator().manual_seed(3)))
    assert not torch.equal(m, mask_positions((5, 40), 0.15, torch.Generator().manual_seed(4)))
    assert mask_positions((2, 3), 0.01, torch.Generator()).sum(1).tolist() == [1, 1]  # at least one


def test_masked_batch_layout():
    ids = torch.arange(24).view(2, 12) % (V - 1)
    b = {"input": ids, "target": ids.roll(-1, 1)}
    m = masked_batch(b, "masked", 0.25, V - 1, torch.Generator().manual_seed(0))
    assert torch.equal(m["input"][m["mask"]], torch.full((6,), V - 1)) and torch.equal(m["input"][~m["mask"]], ids[~m["mask"]])
    assert torch.equal(m["mask_target"], ids) and not m["causal"].any() and "target" not in m
    c = masked_batch(b, "combined", 0.25, V - 1, torch.Generator().manual_seed(0))
    assert torch.equal(c["input"][:2], ids) and torch.equal(c["input"][2:], m["input"])
    assert c["causal"].tolist() == [True, True, False, False] and torch.equal(c["target"], b["target"])


# ---------------------------------------------------------------- the bidirectional pass


def test_bidirectional_pass_sees_later_positions_and_causal_does_not():
    model = tiny_model()
    idx = torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(1))
    later = idx.clone()
    later[:, 9] = (later[:, 9] + 1) % V  # change position 9 only
    with torch.no_grad():
        c0, c1 = model(idx).logits, model(later).logits
        b0, b1 = model(idx, causal=False).logits, model(later, causal=False).logits
        rows = torch.tensor([True, False])  # row 0 causal, row 1 bidirectional, in one call
        r0, r1 = model(idx, causal=rows).logits, model(later, causal=rows).logits
    assert torch.equal(c0[:, :9], c1[:, :9])  # causal: positions before 9 never see it
    assert (b0[:, :9] - b1[:, :9]).abs().amax() > 1e-4  # bidirectional: they do
    assert torch.allclose(r0[0], c0[0], atol=1e-6) and torch.allclose(r0[1], b0[1], atol=1e-6)
    assert torch.equal(r0[0, :9], r1[0, :9]) and (r0[1, :9] - r1[1, :9]).abs().amax() > 1e-4


def test_bidirectional_pass_keeps_left_padding_masked():
    model = tiny_model()
    idx = torch.randint(1, V, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], 1)  # 3 pads to the left
    with torch.no_grad():
        plain = model(idx, causal=False).logits
        cache = model.new_cache(1, 13, pad=torch.tensor([3]))
        out = model(padded, cache, causal=False).logits
    assert torch.allclose(out[:, 3:], plain, atol=1e-5)


@pytest.mark.parametrize("backbone", ["mamba", "retnet", "linear"])
def test_recurrent_stack_refuses_a_bidirectional_pass(backbone):
    torch.manual_seed(0)
    model = LWM(ModelConfig(backbone=backbone, n_layer=1, d_model=32, n_head=2, context=16, vocab_size=V))
    with pytest.raises(ValueError, match="attend both ways"):
        model(torch.zeros(1, 4, dtype=torch.long), causal=False)


def test_combined_is_next_plus_alpha_masked_of_two_passes():
    model = tiny_model(seed=1)
    ids = torch.randint(V - 1, (3, 16), generator=torch.Generator().manual_seed(0))
    b = masked_batch({"input": ids, "target": ids.roll(-1, 1)}, "combined", 0.2, V - 1, torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = combined_loss(model(**model_inputs(b)), b, alpha=0.37)  # one call, 2B rows
        nxt = next_token_loss(model(ids).logits, b["target"])  # two separate passes
        msk = masked_token_loss(model(b["input"][3:], causal=False).logits, ids, b["mask"])
    assert out.total.item() == pytest.approx((nxt + 0.37 * msk).item(), rel=1e-5)
    assert out.parts["loss"] == pytest.approx(nxt.item(), rel=1e-5)
    assert out.parts["loss_masked"] == pytest.approx(msk.item(), rel=1e-5)
    m = {k: (v[3:] if k in ("input", "causal") else v) for k, v in b.items() if k != "target"}
    with torch.no_grad():
        assert masked_lm_loss(model(**model_inputs(m)), m).total.item() == pytest.approx(msk.item(), rel=1e-5)


# ---------------------------------------------------------------- config and tokenizer


@pytest.mark.parametrize("override, match", [
    ("train.objective=bert", "train.objective must be one of next, masked, combined"),
    ("train.mask_rate=0", "train.mask_rate must be between 0 and 1"),
    ("train.mask_rate=1.5", "train.mask_rate"),
    ("train.mask_alpha=-1", "train.mask_alpha must be a finite number"),
    ("train.mask_alpha=nan", "train.mask_alpha"),
])
def test_bad_objective_settings_are_one_line_errors(tiny_cfg, override, match):
    with pytest.raises(ConfigError, match=match) as e:
        tiny_cfg(override)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model", [["model.backbone=mamba"], ["model.backbone=linear"],
                                   ["model.backbone=hybrid", "model.n_layer=2", "model.layers=attn,retnet"]])
def test_recurrent_layers_with_masked_objective_refused(tiny_cfg, model):
    for objective in ("masked", "combined"):
        with pytest.raises(ConfigError, match="cannot make") as e:
            tiny_cfg(*model, f"train.objective={objective}")
        assert "\n" not in str(e.value)
    tiny_cfg(*model)  # next-token: fine


def test_world_recipe_refuses_masked_objective(tmp_path):
    with pytest.raises(ConfigError, match="not available to recipe world"):
        build_config("babyai", ["train.objective=combined", f"out_dir={tmp_path}"])


def test_defaults_change_nothing(corpus_text):
    assert TrainConfig().objective == "next"
    plain = TextTokenizer.train("char", corpus_text)
    assert plain.mask_id is None and plain.vocab_size == len(set(corpus_text)) + 256  # as before <mask> existed
    masked = TextTokenizer.train("char", corpus_text, mask=True)
    assert masked.vocab_size == plain.vocab_size + 1 and masked.mask_id == plain.vocab_size  # appended last
    assert torch.equal(masked.encode(corpus_text[:500]), plain.encode(corpus_text[:500]))  # no id moved
    assert masked.encode("a<mask>b").tolist() == [*plain.encode("a").tolist(), masked.mask_id, *plain.encode("b").tolist()]
    assert masked.decode(masked.encode("a<mask>b")) == "a<mask>b"


def test_next_run_tokenizer_has_no_mask(trained_run):
    meta = json.loads((trained_run / "tokenizer" / "tokenizer_meta.json").read_text())
    tok = TextTokenizer.load(trained_run / "tokenizer")
    assert tok.mask_id is None and tok.vocab_size == meta["vocab_size"]


# ---------------------------------------------------------------- a trained masked run

MASKED = ("train.objective=masked", "train.mask_rate=0.25", "model.n_layer=2", "model.d_model=48", "model.n_head=4",
          "train.max_steps=200", "train.eval_interval=100", "train.batch_size=32", "train.lr=0.01", "train.min_lr=0.001",
          "train.warmup_steps=5")


@pytest.fixture(scope="session")
def masked_run(tmp_path_factory, corpus_file):
    cfg = tiny_config(corpus_file, tmp_path_factory.mktemp("masked"), "masked", *MASKED)
    train(cfg, **QUIET)
    return cfg.run_dir


def test_masked_run_fills_held_out_text_better_than_chance(masked_run):
    from worldloom.run import load_run

    run = load_run(masked_run)
    data, tok = prepare_text(run.cfg, run.tokenizer)
    majority = Counter(data.train.tolist()).most_common(1)[0][1] / len(data.train)  # always guess the commonest token
    gen = torch.Generator().manual_seed(0)
    hits = total = 0
    for w in data.windows("val", run.cfg.model.context, 32):
        b = masked_batch(w, "masked", 0.15, tok.mask_id, gen)
        with torch.no_grad():
            logits = run.model(**model_inputs(b)).logits
        hits += (logits.argmax(-1)[b["mask"]] == b["mask_target"][b["mask"]]).sum().item()
        total += b["mask"].sum().item()
    assert total > 200 and hits / total > majority + 0.15, (hits / total, majority)
    rows = [r for r in metrics(masked_run) if "loss_masked" in r]
    assert rows and all(r["loss"] == r["loss_masked"] for r in rows)  # the trained figure is the masked loss


def test_masked_run_held_out_figure_is_the_masked_loss(masked_run, capsys):
    from worldloom.recipes.text import TextTask
    from worldloom.run import read_run_config

    task = TextTask(read_run_config(masked_run), masked_run, True)
    assert "held-out loss = masked-token cross-entropy" in task.describe()  # said in the run's first line
    run_val = [r["val_loss"] for r in metrics(masked_run) if "val_loss" in r][-1]
    assert main(["eval", str(masked_run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["masked_tokens"] > 100 and 0 < res["loss_masked"] < 2.8  # well under the unigram entropy (~3)
    assert abs(res["loss_masked"] - run_val) < 0.3  # both: masked-token loss of the same model on held-out text
    assert main(["eval", str(masked_run)]) == 0
    assert "masked-token loss" in capsys.readouterr().out


def test_fill_cli_fills_every_mask(masked_run, capsys):
    text = "A big dog sat under the tree."  # within the 32-token context
    holed = text.replace("og", "o<mask>").replace("ree", "r<mask><mask>")
    for extra in ([], ["--parallel"]):
        assert main(["fill", str(masked_run), holed, *extra]) == 0
        out = capsys.readouterr().out.rstrip("\n")
        assert "<mask>" not in out and len(out) == len(text)
        kept = [i for i, ch in enumerate(holed.replace("<mask>", "\0")) if ch != "\0"]
        assert [out[i] for i in kept] == [text[i] for i in kept]  # only the holes changed


def test_fill_refuses_next_token_runs_and_texts_without_masks(trained_run, masked_run, capsys):
    assert main(["fill", str(trained_run), "a <mask> b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldloom: error: ") and "train.objective=next" in err and err.count("\n") == 1
    assert main(["fill", str(masked_run), "no holes here"]) == 2
    assert "no <mask>" in capsys.readouterr().err
    assert main(["fill", str(masked_run), "<mask>" * 40]) == 2
    assert "context" in capsys.readouterr().err
    assert main(["generate", str(masked_run), "The"]) == 2  # a fill-mask model does not continue text
    assert "worldloom fill" in capsys.readouterr().err


# ---------------------------------------------------------------- resume


def test_combined_resume_is_bit_identical(tiny_cfg):
    common = (*EXACT, "train.objective=combined", "train.mask_alpha=0.5", "train.lr=0.003", "train.min_lr=0.003")
    a = tiny_cfg(*common, f"train.max_steps={2 * N}", name="a")
    b = tiny_cfg(*common, f"train.max_steps={N}", name="b")
    train(a, **QUIET)
    train(b, **QUIET)
    train(resume=b.run_dir, overrides=[f"train.max_steps={2 * N}"], **QUIET)
    assert_same_run(a.run_dir, b.run_dir, 2 * N)
    masked_a = [r["loss_masked"] for r in metrics(a.run_dir) if "loss_masked" in r]
    assert len(masked_a) == 2 * N and masked_a == [r["loss_masked"] for r in metrics(b.run_dir) if "loss_masked" in r]


def test_resume_cannot_switch_a_next_run_to_masked(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=2", "train.eval_interval=2")
    train(cfg, **QUIET)
    with pytest.raises(ConfigError, match="needs a <mask> token"):
        train(resume=cfg.run_dir, overrides=["train.objective=masked", "train.max_steps=4"], **QUIET)
