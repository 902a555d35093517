"""LoRA runs and Hugging Face interop: adapter-only checkpoints, `lora merge`, `export hf` of a LoRA
run (base + PEFT adapter, or merged), `import hf` of a transformers Llama folder.

Runs are built directly (random weights through the real checkpoint path, conftest.make_text_run
and make_adapter_run); the Llama folders are tiny random models saved by transformers itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from conftest import SHORT_TEXT, make_adapter_run, make_text_run  # noqa: E402
from worldloom.adapters import lora  # noqa: E402
from worldloom.adapters.folder import merge_run  # noqa: E402
from worldloom.checkpoint import save_checkpoint  # noqa: E402
from worldloom.cli import main  # noqa: E402
from worldloom.config import ModelConfig, RunConfig  # noqa: E402
from worldloom.errors import CheckpointError, ConfigError, WorldloomError  # noqa: E402
from worldloom.export.hf import ExportError, export_hf  # noqa: E402
from worldloom.export.import_hf import import_hf  # noqa: E402
from worldloom.model import LWM  # noqa: E402
from worldloom.run import LoadedRun, load_run, read_run_config  # noqa: E402
from worldloom.tokenize import TextTokenizer  # noqa: E402

TOL = 1e-4


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits


def ids(vocab: int, B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("worldloom: error: "), err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A GQA tied base with an adapter on every projection; an untied base with adapters on some layers only."""
    root = tmp_path_factory.mktemp("lora")
    make_text_run(root / "base", tie=True, n_head=4, n_kv_head=2)
    make_text_run(root / "base2", tie=False, n_head=4, n_kv_head=1, seed=3)
    _, full = make_adapter_run(root / "base", root / "full")
    _, some = make_adapter_run(root / "base2", root / "some", rank=2, alpha=6, targets="blocks.0.attn.qkv,down")
    return {"root": root, "full": (root / "full", full), "some": (root / "some", some)}


# ---------------------------------------------------------------- adapter-only checkpoints


def test_adapter_checkpoint_holds_only_adapters_and_loads_back(runs):
    run_dir, model = runs["full"]
    run = load_run(run_dir)
    with safe_open(str(run.checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(lora.adapter_state(model)) and all(".adapters.default." in k for k in keys)
    x = ids(run.cfg.model.vocab_size)
    adapted = logits(run.model, x)
    assert torch.equal(adapted, logits(model.eval(), x))
    with lora.disabled(run.model):
        assert (logits(run.model, x) - adapted).abs().max() > 0.1  # the adapter changes the model


def test_changed_base_is_refused_by_its_hash(runs, tmp_path):
    shutil.copytree(runs["root"] / "base", tmp_path / "base")
    make_adapter_run(tmp_path / "base", tmp_path / "ad")
    base = load_run(tmp_path / "base")
    with torch.no_grad():
        base.model.norm.weight.add_(0.01)
    save_checkpoint(tmp_path / "base", base.model, None, {"step": 1, "elapsed": 0.0})
    with pytest.raises(CheckpointError, match="has changed since this run was tuned"):
        load_run(tmp_path / "ad")


# ---------------------------------------------------------------- lora merge


def test_merge_is_a_plain_run_with_the_same_logits(runs, tmp_path, capsys):
    run_dir, _ = runs["full"]
    out = tmp_path / "out" / "merged"
    assert main(["lora", "merge", str(run_dir), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # no temporary folder left
    cfg = read_run_config(out)
    assert cfg.lora.rank == 0 and cfg.tune.base_hash == read_run_config(run_dir).tune.base_hash
    merged, adapted = load_run(out), load_run(run_dir)
    assert not lora.has_lora(merged.model)
    ckpt_files = {p.name for p in merged.checkpoint.iterdir()}
    assert ckpt_files == {"model.safetensors", "state.json"}
    x = ids(cfg.model.vocab_size)
    want = logits(adapted.model, x)  # logits of O(1) weights: |logit| up to ~10, so fp32 rounding is ~1e-6 of them
    assert (logits(merged.model, x) - want).abs().max() < 1e-5 * want.abs().max()
    # a plain run again: another adapter can start from it, and it exports
    make_adapter_run(out, tmp_path / "again")
    assert lora.has_lora(load_run(tmp_path / "again").model)
    hf = transformers.LlamaForCausalLM.from_pretrained(export_hf(merged, tmp_path / "hf"), dtype=torch.float32).eval()
    assert (hf(x).logits.detach() - logits(adapted.model, x)).abs().max() < TOL


def test_merged_run_generates_and_evaluates(runs, tmp_path, capsys):
    out = merge_run(runs["full"][0], tmp_path / "merged")
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT * 3)
    assert main(["generate", str(out), "To be", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["eval", str(out), "--data", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["loss"] > 0


def test_merge_refuses_plain_runs_and_used_folders(runs, tmp_path, capsys):
    assert main(["lora", "merge", str(runs["root"] / "base"), str(tmp_path / "m")]) == 2
    assert "has no LoRA adapters" in one_line_error(capsys)
    assert not (tmp_path / "m").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert main(["lora", "merge", str(runs["full"][0]), str(used)]) == 2
    assert "not empty" in one_line_error(capsys)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    assert main(["lora", "split", "a", "b"]) == 2
    one_line_error(capsys)


# ---------------------------------------------------------------- export hf of a LoRA run


def load_peft(out: Path, caplog):
    """The exported base with its PEFT adapter, and every warning or log record loading them gave."""
    base = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return model, said


@pytest.mark.parametrize("case", ["full", "some"])
def test_peft_round_trip(runs, tmp_path, caplog, case):
    run = load_run(runs[case][0])
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    expected = (["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"] if case == "full" else
                ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                 "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"])
    assert sorted(config["target_modules"]) == expected
    assert config["r"] == run.cfg.lora.rank and config["lora_alpha"] == run.cfg.lora.alpha
    model, said = load_peft(out, caplog)
    assert not [s for s in said if "missing" in s.lower() or "unexpected" in s.lower()], said
    saved = set(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert saved == set(peft.get_peft_model_state_dict(model))  # every PEFT weight came from the file
    x = ids(run.cfg.model.vocab_size, B=3, T=20)
    ours = logits(run.model, x)
    assert (model(x).logits.detach() - ours).abs().max() < TOL
    with model.disable_adapter(), lora.disabled(run.model):  # the folder's model is the base, unmerged
        base = logits(run.model, x)
        assert (model(x).logits.detach() - base).abs().max() < TOL
    assert (base - ours).abs().max() > 0.1


def test_a_missing_adapter_tensor_is_what_the_warning_check_catches(runs, tmp_path, caplog):
    out = export_hf(load_run(runs["full"][0]), tmp_path / "hf")
    path = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors.pop(next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k))
    save_file(tensors, str(path))
    _, said = load_peft(out, caplog)
    assert any("missing adapter keys" in s for s in said)


def test_merged_export_and_overwrite(runs, tmp_path, capsys):
    run = load_run(runs["some"][0])
    out = tmp_path / "hf"
    assert main(["export", "hf", str(runs["some"][0]), str(out)]) == 0
    assert "PeftModel" in capsys.readouterr().out
    assert main(["export", "hf", "--merged", str(runs["some"][0]), str(out)]) == 0  # over the earlier export
    assert not (out / "adapter").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = ids(run.cfg.model.vocab_size)
    assert (hf(x).logits.detach() - logits(run.model, x)).abs().max() < TOL


def test_export_refuses_adapters_without_a_llama_layer(tmp_path):
    mc = ModelConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=40, value_head=True)
    model = LWM(mc)
    lora.apply_lora(model, rank=2, alpha=4, targets="qkv,value")
    run = LoadedRun(RunConfig(model=mc), model, None, {}, None)
    with pytest.raises(ExportError, match="adapter on layer value has no Llama layer"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- import hf

WORDS = "the cat dog sat ran on a mat log and then".split()


def save_llama(folder: Path, *, vocab: int, tie: bool, heads: int = 4, kv: int = 2, tok_words: int = len(WORDS) + 1,
               seed: int = 0, **save) -> Path:
    """A tiny random LlamaForCausalLM saved by transformers (safetensors) with a word-level tokenizer.json."""
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                                   tie_word_embeddings=tie, rope_theta=500.0, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1) weights, so that a wrong mapping shows in the logits
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "embed" in name else 1.0 / p.shape[-1] ** 0.5)
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True, **save)
    vocab_words = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS[: tok_words - 1])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab_words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return folder


IMPORTS = {
    "gqa-untied-padded": dict(vocab=20, tie=False, heads=4, kv=2),  # 12 tokens in tokenizer.json, 20 embedding rows
    "mha-tied": dict(vocab=len(WORDS) + 1, tie=True, heads=2, kv=2),
    "sharded": dict(vocab=20, tie=False, heads=4, kv=1, max_shard_size="8KB"),
}


@pytest.mark.parametrize("case", sorted(IMPORTS))
def test_import_matches_transformers_and_round_trips(tmp_path, case):
    src = save_llama(tmp_path / "llama", **IMPORTS[case])
    if case == "sharded":
        assert (src / "model.safetensors.index.json").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    run_dir = import_hf(src, ["name=base", f"out_dir={tmp_path / 'runs'}"])
    assert run_dir == tmp_path / "runs" / "base"
    run = load_run(run_dir)
    mc = run.cfg.model
    assert (mc.kv_heads, mc.tie_weights, mc.context, run.cfg.tokenizer.kind) == (IMPORTS[case]["kv"], IMPORTS[case]["tie"], 64, "hf")
    x = ids(mc.vocab_size, B=3, T=24)
    ours = logits(run.model, x)
    assert (ours - hf(x).logits.detach()).abs().max() < TOL
    assert ours.std() > 0.3
    text = "the cat sat on a mat zebra"
    assert run.tokenizer.encode(text).tolist() == Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids
    back = transformers.LlamaForCausalLM.from_pretrained(export_hf(run, tmp_path / "back"), dtype=torch.float32).eval()
    assert (back(x).logits.detach() - hf(x).logits.detach()).abs().max() < TOL


def test_imported_run_generates_tunes_and_asks_for_eval_data(tmp_path, capsys):
    src = save_llama(tmp_path / "llama", vocab=16, tie=True)
    assert main(["import", "hf", str(src), "name=imp", f"out_dir={tmp_path}", "model.context=32"]) == 0
    run_dir = tmp_path / "imp"
    assert str(run_dir) in capsys.readouterr().out
    assert read_run_config(run_dir).model.context == 32
    assert main(["generate", str(run_dir), "the cat", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 2
    assert "--data FILE" in one_line_error(capsys)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 40))
    assert main(["eval", str(run_dir), "--data", str(text), "--json"]) == 0
    make_adapter_run(run_dir, tmp_path / "tuned")  # a LoRA run on the imported base loads
    assert lora.has_lora(load_run(tmp_path / "tuned").model)


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


REFUSALS = {
    "pickle": ("weights as pytorch_model.bin, a pickle", None),
    "rope": ("rope scaling", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0})),
    "rope4": ("rope scaling", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    "bias": ("biases", dict(attention_bias=True)),
    "head_dim": ("head_dim 16 is not", dict(head_dim=16)),
    "act": ("activation is gelu", dict(hidden_act="gelu")),
    "other": ("describes a mistral model", dict(model_type="mistral", architectures=["MistralForCausalLM"])),
    "vocab": ("has 12 tokens but the model embeds only vocab_size=8", dict(vocab_size=8)),
    "override": ("model.n_layer is the imported model's", None),
    "extra": ("tensors a plain Llama has not (model.layers.0.self_attn.q_proj.bias)", None),
    "used": ("not empty", None),
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("hf") / "llama", vocab=16, tie=False)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_import_refusals_are_one_line(llama_folder, tmp_path, capsys, case):
    needle, changes = REFUSALS[case]
    src = tmp_path / "llama"
    shutil.copytree(llama_folder, src)
    args = ["import", "hf", str(src), "name=x", f"out_dir={tmp_path / 'runs'}"]
    if case == "pickle":
        (src / "model.safetensors").rename(src / "pytorch_model.bin")  # never opened: the name is enough
    elif case == "override":
        args.append("model.n_layer=1")
    elif case == "extra":
        tensors = load_file(str(src / "model.safetensors"))
        save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, str(src / "model.safetensors"))
    elif case == "used":
        (tmp_path / "runs" / "x").mkdir(parents=True)
        (tmp_path / "runs" / "x" / "keep.txt").write_text("mine")
    else:
        edit_config(src, **changes)
    assert main(args) == 2
    assert needle in one_line_error(capsys)
    left = sorted(p.name for p in (tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else []
    assert left == (["x"] if case == "used" else [])


def test_a_new_run_cannot_learn_an_hf_tokenizer():
    with pytest.raises(ConfigError, match="tokenizer.kind=hf is a tokenizer imported"):
        TextTokenizer.train("hf", SHORT_TEXT)
    assert issubclass(ConfigError, WorldloomError)
