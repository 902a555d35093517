"""Quantised runs (worldloom.quant): packing, the quantisers, BitLinear's straight-through gradient, the
int8 / ternary inference layers against their dequantised references, and `worldloom quantize` end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from worldloom.checkpoint import latest_checkpoint, read_state
from worldloom.cli import main
from worldloom.io import load_tensors
from worldloom.model import LWM
from worldloom.quant.layers import (BitLinear, Int8Linear, TernaryLinear, backbone_linears, quantiser, swap_linears,
                                    to_bitlinear)
from worldloom.quant.pack import absmax_int8, absmax_tokens, absmean_ternary, pack_ternary, unpack_ternary
from worldloom.run import load_run

# ---------------------------------------------------------------- packing and the quantisers


@given(st.integers(1, 9), st.integers(1, 37), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, cols, seed):
    q = torch.randint(-1, 2, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // 4))  # four weights a byte
    assert torch.equal(unpack_ternary(packed, cols), q)


def test_packing_layout_is_four_codes_a_byte_low_bits_first():
    q = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)  # codes 0 1 2 2 | 0 (+ three pads, code 1)
    assert pack_ternary(q).tolist() == [[0 + (1 << 2) + (2 << 4) + (2 << 6), 0 + (1 << 2) + (1 << 4) + (1 << 6)]]
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_ternary(pack_ternary(q), 9)


def test_absmean_ternary_on_hand_worked_matrices():
    q, s = absmean_ternary(torch.tensor([[0.4, -1.2], [0.0, 2.4]]))  # mean|w| = 1.0
    assert s.item() == pytest.approx(1.0) and q.tolist() == [[0, -1], [0, 1]]  # 2.4 clips to 1
    q, s = absmean_ternary(torch.tensor([[1.2, -6.0], [0.0, 0.8]]))  # mean|w| = 2.0: w / 2 = 0.6, -3, 0, 0.4
    assert s.item() == pytest.approx(2.0) and q.tolist() == [[1, -1], [0, 0]]
    q, s = absmean_ternary(torch.zeros(2, 3))  # no division by zero
    assert q.abs().sum() == 0 and s.item() > 0


def test_absmax_int8_per_channel_and_tokens_on_hand_worked_values():
    q, s = absmax_int8(torch.tensor([[1.0, -0.25], [0.0, 0.254]]))
    assert q.dtype == torch.int8 and q.tolist() == [[127, -32], [0, 127]]  # -0.25 * 127 = -31.75
    assert s.tolist() == pytest.approx([1.0 / 127, 0.254 / 127])
    xq, xs = absmax_tokens(torch.tensor([[2.0, -0.6, 0.1], [0.0, 0.0, -1.0]]))
    assert xq.tolist() == [[127, -38, 6], [0, 0, -127]]  # 2 / 127 per step: -38.1, 6.35
    assert xs.squeeze(1).tolist() == pytest.approx([2.0 / 127, 1.0 / 127])


# ---------------------------------------------------------------- layers


def test_bitlinear_gradient_is_the_straight_through_value():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    bit = to_bitlinear(lin)
    assert bit.weight is lin.weight  # the latent weight is the base's parameter
    x = torch.randn(3, 12, requires_grad=True)
    g = torch.randn(3, 5)
    (bit(x) * g).sum().backward()
    # the reference: the quantised operands as leaves, so their gradients are the straight-through ones
    qw, sw = absmean_ternary(lin.weight.detach())
    qx, sx = absmax_tokens(x.detach())
    w_leaf = (qw.float() * sw).requires_grad_()
    x_leaf = (qx * sx).requires_grad_()
    (F.linear(x_leaf, w_leaf, lin.bias.detach()) * g).sum().backward()
    assert lin.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert torch.allclose(lin.weight.grad, w_leaf.grad, atol=1e-6)
    assert torch.allclose(x.grad, x_leaf.grad, atol=1e-6)
    assert torch.allclose(bit(x), F.linear(x_leaf, w_leaf, lin.bias), atol=1e-6)  # and the forward is quantised


@pytest.mark.parametrize("K,N", [(48, 144), (63, 47), (8, 3), (1, 5)])
def test_int8_layer_matches_its_dequantised_reference(K, N):
    torch.manual_seed(K)
    lin = nn.Linear(K, N)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(2, 7, K)
    ref = F.linear(x, m.weight, m.bias)  # the int8 weight times its scales, in fp32
    y = m(x)
    assert y.shape == (2, 7, N)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()  # the kernel's sums are fp32: rounding only
    assert (y - lin(x)).abs().max() <= 0.05 * lin(x).abs().max()  # and int8 is close to the float layer
    yb = m(x.bfloat16())  # under bf16 the kernel still runs in fp32 (torch's bf16 kernel crashes on these shapes)
    assert yb.dtype == torch.bfloat16 and (yb.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("kernel", ["int8pack", "int_mm"])
@pytest.mark.parametrize("K,N", [(48, 144), (63, 47), (1, 5)])
def test_ternary_layer_matches_bitlinear(kernel, K, N):
    torch.manual_seed(K)
    lin = nn.Linear(K, N)
    m = TernaryLinear.from_linear(lin, kernel)
    x = torch.randn(4, 3, K)
    ref = to_bitlinear(lin)(x)  # the training forward: what QAT optimised
    assert m.weight_packed.shape == (N, -(-K // 4)) and set(m.weight_q.unique().tolist()) <= {-1, 0, 1}
    assert (m(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("K,N", [(48, 144), (63, 47), (1, 5)])
def test_fbgemm_kernel_is_close_to_the_exact_one_and_repacks_after_a_load(K, N):
    """quant.kernel=fbgemm: activations quantised per call to 8 bits (7-bit range), so close to the exact kernels,
    not equal; the packed weight is derived at load (a shell loaded with the weights gives the same outputs)."""
    torch.manual_seed(K)
    lin = nn.Linear(K, N)
    x = torch.randn(1, 5, K)
    for exact, fast in ((Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, "fbgemm")),
                        (TernaryLinear.from_linear(lin), TernaryLinear.from_linear(lin, "fbgemm"))):
        ref, y = exact(x), fast(x)
        assert y.shape == ref.shape == (1, 5, N) and fast.packed is not None and exact.packed is None
        assert (y - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-6
        if K > 1:
            assert not torch.equal(y, ref)  # really another kernel
        shell = type(fast)(K, N, bias=True, kernel="fbgemm")
        shell.load_state_dict(fast.state_dict())
        assert torch.equal(shell(x), y)
    with pytest.raises(ValueError, match="kernel must be"):
        Int8Linear(4, 4, kernel="int_mm")


def tiny_model(**kw) -> LWM:
    from worldloom.config import ModelConfig

    torch.manual_seed(0)
    return LWM(ModelConfig(n_layer=2, d_model=32, n_head=2, context=16, vocab_size=40, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"backbone": "mamba"}, {"backbone": "retnet"}, {"ffn": "moe"}], ids=str)
def test_quantised_model_equals_its_dequantised_copy_on_every_backbone(kw):
    model = tiny_model(**kw)
    x = torch.randint(0, 40, (2, 9))
    names = swap_linears(model, quantiser(8.0))
    assert names and not backbone_linears(model) and isinstance(model.head, nn.Linear)  # the head stays float
    deq = tiny_model(**kw)
    with torch.no_grad():
        for name in names:
            deq.get_submodule(name).weight.copy_(model.get_submodule(name).weight)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, deq(x).logits, atol=1e-4)
        cache = model.new_cache(2, 12)  # a cached decode step too (Mamba reads its weight dtype here)
        model(x[:, :5], cache=cache)
        assert model(x[:, 5:6], cache=cache).logits.shape == (2, 1, 40)


# ---------------------------------------------------------------- runs end to end


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def quant_runs(trained_run, tmp_path_factory):
    """The session's tiny trained run quantised both ways through the CLI."""
    out = tmp_path_factory.mktemp("quant")
    assert cli("quantize", trained_run, "--bits", "8", f"out_dir={out}", "name=i8") == 0
    assert cli("quantize", trained_run, "--bits", "1.58", f"out_dir={out}", "name=t", "train.max_steps=6",
               "train.eval_interval=3", "train.lr=0.003", "--no-progress") == 0
    return out / "i8", out / "t"


def test_quantised_runs_record_bits_and_store_packed_weights(quant_runs, trained_run):
    i8, t = quant_runs
    for run, bits, key, dtype in ((i8, 8.0, "weight_q", torch.int8), (t, 1.58, "weight_packed", torch.uint8)):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["quant"]["bits"] == bits and cfg["tune"]["base"] == str(trained_run.resolve())
        ckpt = latest_checkpoint(run)
        assert read_state(ckpt)["packed"] == bits and not (ckpt / "optimizer.safetensors").exists()
        tensors = load_tensors(ckpt / "model.safetensors")
        quantised = [k for k in tensors if k.endswith("." + key)]
        assert len(quantised) == 8 and all(tensors[k].dtype == dtype for k in quantised)  # 2 layers x (qkv, proj, gate_up, down)
        assert not any(k.endswith(".weight") and k.startswith("backbone.") and tensors[k].dim() == 2 for k in tensors)
    assert yaml.safe_load((t / "config.yaml").read_text())["recipe"] == "ternary"


def test_ternary_weights_on_disk_are_an_eighth_of_fp16(quant_runs, capsys):
    _, t = quant_runs
    tensors = load_tensors(latest_checkpoint(t) / "model.safetensors")
    run = load_run(t)
    layers = [m for m in run.model.modules() if isinstance(m, TernaryLinear)]
    fp16 = sum(2 * m.in_features * m.out_features for m in layers)  # the quantised linears in fp16
    packed = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.endswith(".weight_packed"))
    scales = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.endswith(".weight_scale"))
    rest = sum(v.numel() * v.element_size() for k, v in tensors.items() if not k.endswith((".weight_packed", ".weight_scale")))
    disk = (latest_checkpoint(t) / "model.safetensors").stat().st_size
    with capsys.disabled():
        print(f"\nternary run weights: packed linears {packed:,} B = {packed / fp16:.4f} of their fp16 {fp16:,} B; "
              f"scales {scales} B; unquantised parts (embedding = tied head, norms) {rest:,} B; file {disk:,} B")
    assert packed <= fp16 / 8  # 2 bits a weight (K = 48, 128: no padding)
    assert scales == 4 * len(layers)  # one fp32 scale per matrix
    assert disk - (packed + scales + rest) < 4096  # the rest of the file is the safetensors header


def test_a_run_quantised_for_the_fbgemm_kernel_loads_it(trained_run, tmp_path, capsys):
    assert cli("quantize", trained_run, "--bits", "8", "quant.kernel=fbgemm", f"out_dir={tmp_path}", "name=f8") == 0
    assert yaml.safe_load((tmp_path / "f8" / "config.yaml").read_text())["quant"] == {"bits": 8.0, "kernel": "fbgemm"}
    model = load_run(tmp_path / "f8").model
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.kernel == "fbgemm" and m.packed is not None for m in layers)
    capsys.readouterr()
    assert cli("generate", tmp_path / "f8", "The cat", "--max-new-tokens", "8", "--temperature", "0") == 0
    assert capsys.readouterr().out.startswith("The cat")
    assert "quant.kernel must be exact or fbgemm" in refused(capsys, "quantize", trained_run, "--bits", "8",
                                                             "quant.kernel=avx", f"out_dir={tmp_path}", "name=x")


def test_generate_and_eval_work_on_both_quantised_runs(quant_runs, capsys):
    for run in quant_runs:
        capsys.readouterr()
        assert cli("generate", run, "The cat", "--max-new-tokens", "12", "--temperature", "0") == 0
        out = capsys.readouterr().out
        assert out.startswith("The cat") and len(out) > len("The cat\n")
        assert cli("generate", run, "The", "--max-new-tokens", "4", "--precision", "bf16", "--seed", "1") == 0
        capsys.readouterr()
        assert cli("eval", run, "--json") == 0
        assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_int8_keeps_the_base_loss_and_qat_beats_plain_ternary_rounding(quant_runs, trained_run, capsys):
    from worldloom.evaluate import full_heldout
    from worldloom.recipes.text import prepare_text

    losses = {}
    for run in (trained_run, *quant_runs):
        capsys.readouterr()
        assert cli("eval", run, "--json") == 0
        losses[run.name] = json.loads(capsys.readouterr().out)["loss"]
    base = load_run(trained_run)
    swap_linears(base.model, quantiser(1.58))  # the base's weights rounded to ternary, no training
    data, _ = prepare_text(base.cfg, base.tokenizer)
    rounded = full_heldout(base.model, data, base.cfg.model.context, 16, "fp32", "cpu")["loss"]
    with capsys.disabled():
        print(f"\nheld-out loss: base {losses['trained']:.4f}, int8 {losses['i8']:.4f}, ternary rounded without "
              f"training {rounded:.4f}, ternary after 6 QAT steps {losses['t']:.4f}")
    assert abs(losses["i8"] - losses["trained"]) <= 0.01 * losses["trained"]  # the int8 target: within 1%
    assert losses["t"] < rounded  # QAT recovers part of what plain rounding loses


def test_ternary_inference_model_equals_the_qat_model_it_was_packed_from(trained_run):
    model = load_run(trained_run).model
    swap_linears(model, to_bitlinear)  # the QAT model (latent weights = the base's)
    x = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(x).logits
        swap_linears(model, quantiser(1.58))
        assert not any(isinstance(m, BitLinear) for m in model.modules())
        assert sum(isinstance(m, TernaryLinear) for m in model.modules()) == 8
        assert torch.allclose(model(x).logits, ref, atol=1e-4)


def test_a_qat_run_stopped_before_packing_resumes_then_packs(trained_run, tmp_path):
    from worldloom.quant.folder import quant_config
    from worldloom.train import train

    cfg = quant_config(trained_run, 1.58, [f"out_dir={tmp_path}", "name=t", "train.max_steps=2", "train.eval_interval=2"])
    train(cfg, progress=False, log=lambda *a: None)  # the loop alone: a QAT killed before pack_run
    assert "packed" not in read_state(latest_checkpoint(cfg.run_dir))
    assert sum(isinstance(m, BitLinear) for m in load_run(cfg.run_dir).model.modules()) == 8  # the latent QAT model loads
    assert cli("train", "--resume", cfg.run_dir, "train.max_steps=4", "--no-progress") == 0
    state = read_state(latest_checkpoint(cfg.run_dir))
    assert state["packed"] == 1.58 and state["step"] == 4
    assert sum(isinstance(m, TernaryLinear) for m in load_run(cfg.run_dir).model.modules()) == 8


def test_int8_of_a_lora_run_quantises_the_merged_weights(tmp_path):
    from conftest import make_adapter_run, make_text_run

    base = make_text_run(tmp_path / "base", tie=True)
    lora, _ = make_adapter_run(base, tmp_path / "lora")
    assert cli("quantize", lora, "--bits", "8", f"out_dir={tmp_path}", "name=i8") == 0
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        want, got, plain = (load_run(r).model(x).logits for r in (lora, tmp_path / "i8", base))
    assert (got - want).abs().max() < 0.03 * want.abs().max()  # the adapters are in: int8 error only
    assert (plain - want).abs().max() > 0.1 * want.abs().max()  # (without them the logits differ far more)


# ---------------------------------------------------------------- refusals: one line, exit 2


def refused(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldloom: error: ") and err.count("\n") == 1, err
    return err


def test_refusals(quant_runs, trained_run, tmp_path, capsys):
    i8, t = quant_runs
    assert "--bits must be 8" in refused(capsys, "quantize", trained_run, "--bits", "4")
    assert "be quantised again" in refused(capsys, "quantize", i8, "--bits", "1.58")
    assert "train further" in refused(capsys, "train", "--resume", i8)
    assert "train further" in refused(capsys, "train", "--resume", t, "train.max_steps=20")
    assert "be tuned" in refused(capsys, "tune", "sft", t, "data.path=x.jsonl", f"out_dir={tmp_path}")
    assert "model.n_layer cannot be set" in refused(capsys, "quantize", trained_run, "--bits", "8", "model.n_layer=3",
                                                   f"out_dir={tmp_path}")
    assert "train.max_steps cannot be set" in refused(capsys, "quantize", trained_run, "--bits", "8", "train.max_steps=3",
                                                     f"out_dir={tmp_path}")
    assert "no Llama form" in refused(capsys, "export", "hf", i8, tmp_path / "hf")
    assert "train --resume" in refused(capsys, "quantize", trained_run, "--bits", "1.58", f"out_dir={t.parent}", "name=t")
    assert "not empty" in refused(capsys, "quantize", trained_run, "--bits", "8", f"out_dir={i8.parent}", "name=i8")
    for recipe, bits, what in (("world", "8", "world run"), ("sft", "1.58", "only a text run")):
        other = tmp_path / recipe
        shutil.copytree(trained_run, other)
        cfg = yaml.safe_load((other / "config.yaml").read_text())
        cfg["recipe"] = recipe
        (other / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert what in refused(capsys, "quantize", other, "--bits", bits, f"out_dir={tmp_path}")
