"""Every backbone of the layer stack (transformer, mamba, mamba2, retnet, linear, hybrid; SwiGLU or MoE feed-forward)
behind one protocol: cached == uncached, left padding exact, gradients, checkpoints, the CLI."""

from __future__ import annotations

import json

import math

import pytest
import torch

from worldloom.backbones.mamba import MambaMixer
from worldloom.backbones.mamba2 import Mamba2Mixer
from worldloom.backbones.moe import MoEFeedForward
from worldloom.backbones.retnet import MultiScaleRetention
from worldloom.checkpoint import save_checkpoint
from worldloom.cli import main
from worldloom.config import (Mamba2Config, MambaConfig, ModelConfig, MoEConfig, RunConfig, build_config, from_dict,
                              save_yaml, to_dict)
from worldloom.decode import SamplingConfig, generate, generate_ids
from worldloom.errors import ConfigError
from worldloom.export.hf import ExportError, export_hf
from worldloom.losses import language_model_loss
from worldloom.model import LWM
from worldloom.run import LoadedRun, load_run
from worldloom.tokenize import TextTokenizer
from worldloom.train.optim import param_groups

V, CTX = 37, 24
ATOL = 1e-5
SMALL = dict(n_layer=3, n_head=2, d_model=16, context=CTX, vocab_size=V, chunk=5, mamba=MambaConfig(d_state=4),
             mamba2=Mamba2Config(d_state=4, head_dim=8), moe=MoEConfig(experts=4, top_k=2))

CASES = {
    "transformer": dict(backbone="transformer"),
    "mamba": dict(backbone="mamba"),
    "mamba2": dict(backbone="mamba2"),
    "retnet": dict(backbone="retnet"),
    "hybrid": dict(backbone="hybrid", layers="mamba,attn,retnet"),
    "hybrid-moe": dict(backbone="hybrid", layers="retnet,mamba,attn", ffn="moe"),
    "hybrid-mamba2": dict(backbone="hybrid", layers="mamba2,attn,mamba"),
    "linear": dict(backbone="linear"),
    "hybrid-linear": dict(backbone="hybrid", layers="linear,attn,mamba2"),
    "mamba-noffn": dict(backbone="mamba", n_layer=2, ffn="none"),
}


def make_model(case: str, seed: int = 0, **kw) -> LWM:
    args = {**SMALL, **CASES[case], **kw}
    torch.manual_seed(seed)
    model = LWM(ModelConfig(**args))
    with torch.no_grad():  # peaked logits: no near-ties between greedy choices; Δ far from 0 so states matter
        model.embed.weight.normal_(0.0, 1.0)
        for m in model.modules():
            if isinstance(m, MambaMixer):
                m.dt_proj.bias.add_(1.0)
            if isinstance(m, Mamba2Mixer):
                m.dt_bias.add_(1.0)
    return model.eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- cache == full forward


@pytest.mark.parametrize("case", sorted(CASES))
def test_token_by_token_equals_full_forward(case):
    model = make_model(case)
    x = ids(2, CTX)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, CTX)
        steps = [model(x[:, i : i + 1], cache).logits for i in range(CTX)]
    assert cache.length == CTX
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_prefill_then_steps_equals_full_forward(case):
    model = make_model(case)
    x = ids(2, CTX)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, CTX)
        parts, i = [], 0
        for n in (7, 6, 1, 4, 1, 1, 3, 1):  # prefill longer than a chunk, more chunks, single tokens
            parts.append(model(x[:, i : i + n], cache).logits)
            i += n
    assert i == CTX
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_left_padded_batch_matches_rows_alone(case):
    """Logits of a left-padded row (prompt, then tokens one at a time) == the same tokens alone."""
    model = make_model(case)
    lengths = [CTX - 8, 3, CTX - 11]
    rows = [ids(1, n, seed=10 + n)[0] for n in lengths]
    L = max(lengths)
    batch = torch.full((len(rows), L), 5, dtype=torch.long)  # pad id 5: its embedding is not zero
    pad = torch.tensor([L - n for n in lengths])
    for r, row in enumerate(rows):
        batch[r, L - len(row):] = row
    extra = ids(len(rows), 4, seed=99)
    with torch.no_grad():
        cache = model.new_cache(len(rows), CTX, pad)
        prompt_logits = model(batch[:, :6], cache).logits  # a prefill that ends inside the padding of one row
        prompt_logits = torch.cat([prompt_logits, model(batch[:, 6:], cache).logits], 1)
        step_logits = torch.cat([model(extra[:, j : j + 1], cache).logits for j in range(extra.shape[1])], 1)
        for r, row in enumerate(rows):
            alone = model(torch.cat([row, extra[r]])[None]).logits
            n = len(row)
            torch.testing.assert_close(prompt_logits[r, L - n:], alone[0, :n], atol=ATOL, rtol=0)
            torch.testing.assert_close(step_logits[r], alone[0, n:], atol=ATOL, rtol=0)


def greedy(model, prompts, n, **kw):
    sc = SamplingConfig(max_new_tokens=n, temperature=0.0)
    return torch.stack(list(generate_ids(model, prompts, sc, **kw)), 1).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_batched_cached_uncached_agree(case):
    """Batched left-padded greedy == each prompt alone == without the cache, across a context roll-over."""
    model = make_model(case)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    n = CTX + 6  # fills the context: the cache is rebuilt from the last half context
    batched = greedy(model, prompts, n)
    assert batched == [greedy(model, [p], n)[0] for p in prompts]
    assert batched == greedy(model, prompts, n, use_cache=False)


def test_recurrent_mixers_ignore_masked_prefix():
    """Mixer level: with the first p positions marked invalid, a row computes (and goes on computing
    from its state) what the rest of it computes alone. Mamba's state is then exactly the same;
    retention's S holds keys rotated at positions shifted by p, which only its outputs undo."""
    torch.manual_seed(0)
    x, more = torch.randn(2, 9, 16), torch.randn(2, 4, 16)
    valid = torch.arange(9)[None] >= torch.tensor([3, 0])[:, None]
    for mixer in (MambaMixer(16, d_state=4, chunk=4), Mamba2Mixer(16, d_state=4, head_dim=8, chunk=4),
                  MultiScaleRetention(16, 2, chunk=4)):
        with torch.no_grad():
            y, st = mixer(x, return_state=True, valid=valid)
            y0, st0 = mixer(x[:1, 3:], return_state=True)
            y2, _ = mixer(more, st)
            y02, _ = mixer(more[:1], st0)
        torch.testing.assert_close(y[:1, 3:], y0, atol=1e-6, rtol=0)
        torch.testing.assert_close(y2[:1], y02, atol=1e-6, rtol=0)
        if isinstance(mixer, (MambaMixer, Mamba2Mixer)):
            torch.testing.assert_close(st.ssm[:1], st0.ssm, atol=1e-6, rtol=0)
            torch.testing.assert_close(st.conv[:1], st0.conv, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- training: gradients, aux loss, init, decay


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_reach_every_parameter(case):
    model = make_model(case, moe=MoEConfig(experts=3)).train()
    x = ids(4, CTX + 1)
    out = language_model_loss(model(x[:, :-1]), {"input": x[:, :-1], "target": x[:, 1:]})
    out.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_moe_aux_loss_is_returned_by_forward_and_reaches_router():
    x = ids(2, CTX + 1)
    batch = {"input": x[:, :-1], "target": x[:, 1:]}
    grads, outs = [], []
    for balance, z in ((0.0, 0.0), (0.5, 0.1)):
        model = make_model("hybrid-moe", moe=MoEConfig(experts=4, balance_coef=balance, z_coef=z)).train()
        out = language_model_loss(model(batch["input"]), batch)
        out.total.backward()
        outs.append(out)
        grads.append([m.router.weight.grad.clone() for m in model.moe_layers()])
    off, on = outs
    assert off.parts["moe_aux"] == 0.0 and on.parts["moe_aux"] > 0.0
    assert on.parts["loss"] == pytest.approx(off.parts["loss"])  # same weights, same cross-entropy
    assert on.total.item() == pytest.approx(on.parts["loss"] + on.parts["moe_aux"], rel=1e-6)
    assert 0.0 <= on.parts["moe_load_min"] <= 2 / 4 <= on.parts["moe_load_max"] <= 1.0  # top-2 of 4
    assert len(grads[1]) == 3  # one MoE per layer
    for g_off, g_on in zip(*grads):
        assert not torch.allclose(g_off, g_on)  # the aux loss changes the router's gradient
    assert "moe_aux" not in language_model_loss(make_model("mamba")(batch["input"]), batch).parts


def test_mamba_init_survives_model_init_and_no_decay_tags():
    model = make_model("hybrid", seed=3)
    m = next(x for x in model.modules() if isinstance(x, MambaMixer))
    torch.testing.assert_close(m.A_log[0], torch.log(torch.arange(1.0, 5.0)))  # S4D-real, not N(0, 0.02)
    assert torch.equal(m.D, torch.ones_like(m.D))
    fresh = LWM(ModelConfig(**SMALL, **CASES["hybrid"]))
    fm = next(x for x in fresh.modules() if isinstance(x, MambaMixer))
    dt = torch.nn.functional.softplus(fm.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6  # Δ in [dt_min, dt_max] after LWM's generic init
    groups = param_groups(fresh, 0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(fm.A_log) in no_decay and id(fm.D) in no_decay
    assert id(fm.in_proj.weight) not in no_decay


def test_residual_projections_are_scaled():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, **CASES["hybrid-moe"], "d_model": 64, "n_head": 4})
    model = LWM(cfg)
    want = 0.02 / math.sqrt(2 * cfg.n_layer)
    blocks = model.backbone.blocks
    projs = [blocks[0].retnet.proj.weight, blocks[1].mamba.out_proj.weight, blocks[2].attn.proj.weight,
             blocks[0].mlp.experts[0].down.weight]
    for w in projs:
        assert abs(w.std().item() - want) < 0.25 * want
    assert abs(blocks[1].mamba.in_proj.weight.std().item() - 0.02) < 0.1 * 0.02


# ---------------------------------------------------------------- checkpoints, compile, export


TEXT = "the cat sat on the mat and the dog ran under the log.\n" * 20


def make_run(run_dir, case: str):
    tok = TextTokenizer.train("char", TEXT)
    mc = ModelConfig(**{**SMALL, **CASES[case], "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = LWM(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move every weight off its init value
    save_checkpoint(run_dir, model, None, {"step": 0, "elapsed": 0.0})
    tok.save(run_dir / "tokenizer")
    save_yaml(to_dict(RunConfig(name=run_dir.name, out_dir=str(run_dir.parent), model=mc)), run_dir / "config.yaml")
    return model.eval(), tok


@pytest.mark.parametrize("case", ["mamba", "mamba2", "retnet", "hybrid-moe"])
def test_checkpoint_round_trip(tmp_path, case):
    model, tok = make_run(tmp_path / "run", case)
    run = load_run(tmp_path / "run")
    assert run.cfg.model == model.cfg
    x = torch.randint(0, tok.vocab_size, (2, CTX))
    with torch.no_grad():
        assert torch.equal(run.model(x).logits, model(x).logits)
    sc = SamplingConfig(max_new_tokens=8, temperature=0.0)
    assert generate(run.model, run.tokenizer, ["the", "a dog"], sc) == generate(model, tok, ["the", "a dog"], sc)


def test_old_model_config_without_new_fields_loads():
    old = {"backbone": "transformer", "n_layer": 2, "n_head": 2, "n_kv_head": 0, "d_model": 16, "d_ff": 0,
           "context": 8, "dropout": 0.0, "tie_weights": True, "rope_theta": 10000.0, "norm_eps": 1e-5, "vocab_size": 9}
    mc = from_dict(ModelConfig, old)
    assert mc.layer_kinds == ["attn", "attn"] and mc.ffn == "swiglu"
    names = [n for n, _ in LWM(mc).named_parameters()]
    for i in range(2):
        for part in ("attn_norm.weight", "attn.qkv.weight", "attn.proj.weight", "mlp_norm.weight",
                     "mlp.gate_up.weight", "mlp.down.weight"):
            assert f"backbone.blocks.{i}.{part}" in names
    assert len(names) == 1 + 2 * 6 + 1  # embedding, 6 per block, final norm (head tied)


@pytest.mark.parametrize("case", ["mamba", "hybrid-moe"])
def test_compiled_decoding_refused_with_a_clear_error(case):
    model = make_model(case)
    assert not model.supports_decode_step
    with pytest.raises(ValueError, match="compile=False"):
        greedy(model, [[1, 2]], 3, compile=True)
    assert make_model("transformer").supports_decode_step


@pytest.mark.parametrize("case, needle", [("mamba", "backbone"), ("hybrid-moe", "backbone")])
def test_export_hf_refuses_other_backbones(case, needle):
    model = make_model(case)
    run = LoadedRun(RunConfig(model=model.cfg), model, None, {}, None)
    with pytest.raises(ExportError, match=needle):
        export_hf(run, "/nonexistent/never-written")
    moe = make_model("transformer", ffn="moe")
    with pytest.raises(ExportError, match="ffn=moe") as e:
        export_hf(LoadedRun(RunConfig(model=moe.cfg), moe, None, {}, None), "/nonexistent/never-written")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- CLI and config


CLI_TINY = ["model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.context=24", "model.chunk=8",
            "model.mamba.d_state=4", "train.max_steps=3", "train.eval_interval=3", "train.eval_batches=1",
            "train.batch_size=2", "train.precision=fp32", "train.threads=1", "train.warmup_steps=1", "train.log_interval=1"]


@pytest.mark.parametrize("overrides", [
    ["model.backbone=mamba"],
    ["model.backbone=hybrid", "model.n_layer=3", "model.layers=mamba,attn,retnet", "model.ffn=moe", "model.moe.experts=4"],
])
def test_cli_train_then_generate(tmp_path, corpus_file, capsys, overrides):
    rc = main(["train", "shakespeare-char", *CLI_TINY, *overrides, f"out_dir={tmp_path}", "name=x",
               f"data.path={corpus_file}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    run = load_run(tmp_path / "x")
    assert run.cfg.model.backbone == overrides[0].split("=")[1]
    assert any(isinstance(m, MoEFeedForward) for m in run.model.modules()) == ("model.ffn=moe" in overrides)
    rows = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 3
    # MoE runs log the router's aux loss beside the cross-entropy, not inside it
    assert all(("moe_aux" in r) == ("model.ffn=moe" in overrides) for r in logged)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "x"), "The cat", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The cat")
    assert main(["generate", str(tmp_path / "x"), "The cat", "--max-new-tokens", "5", "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, needle", [
    (["model.backbone=hybrid", "model.n_layer=2", "model.layers=mamba,atn"], "unknown mixer 'atn'"),
    (["model.backbone=hybrid", "model.n_layer=3", "model.layers=mamba,attn"], "model.n_layer is 3"),
    (["model.backbone=hybrid"], "needs model.layers"),
    (["model.backbone=mamba", "model.n_layer=2", "model.layers=mamba,attn"], "backbone=hybrid"),
    (["model.ffn=moa"], "model.ffn"),
    (["model.ffn=moe", "model.moe.experts=2", "model.moe.top_k=3"], "model.moe.top_k"),
    (["model.chunk=-1"], "model.chunk"),
    (["model.moe.capacity=-1"], "model.moe.capacity"),
    (["model.backbone=mambo"], "did you mean 'mamba'"),
    (["model.backbone=mamba2", "model.d_model=48", "model.n_head=2", "model.mamba2.head_dim=64"], "model.mamba2.head_dim"),
    (["model.backbone=hybrid", "model.n_layer=2", "model.layers=attn,mamba2", "model.mamba2.head_dim=0"], "model.mamba2.head_dim"),
    (["model.mamba.d_conv=0"], "model.mamba.d_conv"),
    (["model.moe.experts=1.5"], "model.moe.experts must be int"),
    (["model.moe=3"], "model.moe must be a mapping"),
    (["model.layers=attn,linera"], "did you mean 'linear'"),
    (["model.backbone=linear", "model.n_layer=2", "model.layers=linear,attn"], "backbone=hybrid"),
])
def test_config_errors_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        cfg = build_config(None, overrides)
        LWM(ModelConfig(**{**to_dict(cfg)["model"], "vocab_size": 5}))  # unknown backbones fail when built
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg


def test_layers_override_parses_and_builds():
    cfg = build_config(None, ["model.backbone=hybrid", "model.n_layer=3", "model.layers=mamba, mamba ,attn"])
    assert cfg.model.layer_kinds == ["mamba", "mamba", "attn"]
    model = LWM(ModelConfig(**{**to_dict(cfg)["model"], "vocab_size": 5, "d_model": 16, "n_head": 2}))
    assert [b.kind for b in model.backbone.blocks] == ["mamba", "mamba", "attn"]
    assert build_config(None, ["model.backbone=transformer", "model.n_layer=2", "model.layers=attn,attn"]).model.layer_kinds == ["attn"] * 2
