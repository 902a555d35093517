"""`worldloom export hf`: the exported folder is a transformers Llama that computes the same logits.

Runs are built directly (random weights, saved through the real checkpoint path), so no
training loop runs here.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from conftest import make_text_run as make_run  # noqa: E402
from worldloom.cli import main  # noqa: E402
from worldloom.export import export_hf  # noqa: E402
from worldloom.run import load_run  # noqa: E402

TOL = 1e-4

CASES = {
    "gqa-tied": dict(tie=True, n_head=4, n_kv_head=2),
    "mha-untied": dict(tie=False, n_head=4, n_kv_head=0, rope_theta=500.0, norm_eps=1e-6, d_ff=48),
    "mqa-untied": dict(tie=False, n_head=4, n_kv_head=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_llama(tmp_path, case):
    run = load_run(make_run(tmp_path / "run", **CASES[case]))
    out = export_hf(run, tmp_path / "hf")
    mc = run.cfg.model

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not mc.tie_weights)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == mc.tie_weights

    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == mc.kv_heads
    assert hf.config.intermediate_size == mc.ff_dim
    assert hf.config.rms_norm_eps == mc.norm_eps
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == mc.tie_weights
    assert torch.equal(hf.lm_head.weight, run.model.head.weight)

    g = torch.Generator().manual_seed(1)
    for B, T in ((3, mc.context), (2, 7), (1, 1)):
        idx = torch.randint(0, mc.vocab_size, (B, T), generator=g)
        with torch.no_grad():
            ours = run.model(idx).logits
            theirs = hf(idx).logits
        assert theirs.shape == ours.shape
        diff = (ours - theirs).abs().max().item()
        assert diff < TOL, f"{case} B={B} T={T}: max |logit diff| {diff:.3g}"
    assert ours.std() > 0.3  # the logits are not near zero, so the tolerance means something


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_matches(tmp_path, kind):
    run = load_run(make_run(tmp_path / "run", tie=True, kind=kind))
    out = export_hf(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for s in ["To be, or not to be", "  two  spaces , and ' quotes ' .", "unseen: é 中文 🙂 Zq\n\ttab"]:
        ids = run.tokenizer.encode(s).tolist()
        assert hf_tok.encode(s) == ids  # same ids, no BOS/EOS added
        assert hf_tok.decode(ids) == run.tokenizer.decode(ids) == s


def test_cli_export_and_overwrite(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run", tie=True, n_kv_head=2)
    out = tmp_path / "hf"
    assert main(["export", "hf", str(run_dir), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert main(["export", "hf", str(run_dir), str(out)]) == 0  # a previous export may be overwritten
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("worldloom: error: "), err
    return err


def test_cli_missing_run(tmp_path, capsys):
    assert main(["export", "hf", str(tmp_path / "nope"), str(tmp_path / "hf")]) == 2
    assert "run folder not found" in one_line_error(capsys)
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_foreign_folder(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run", tie=False)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "hf", str(run_dir), str(out)]) == 2
    assert "not empty" in one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
