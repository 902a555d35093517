"""Smoke tests of every `worldloom` verb, in process (fast), plus the installed console script."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from worldloom.cli import main
from worldloom.config import load_preset, preset_names
from worldloom.decode import SamplingConfig, generate
from worldloom.run import load_run
from worldloom.checkpoint import latest_checkpoint

SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=32", "train.max_steps=4",
         "train.eval_interval=2", "train.eval_batches=1", "train.batch_size=4", "train.precision=fp32", "train.threads=1"]


def run_cli(capsys, *argv) -> tuple[str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out, err


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, corpus_file) -> Path:
    """`worldloom train shakespeare-char <tiny overrides> --no-progress`, once per module."""
    out = tmp_path_factory.mktemp("cli")
    rc = main(["train", "shakespeare-char", *SMALL, f"out_dir={out}", "name=x", f"data.path={corpus_file}", "--no-progress"])
    assert rc == 0
    return out / "x"


# ---------------------------------------------------------------- presets


def test_presets_lists_every_preset(capsys):
    out, _ = run_cli(capsys, "presets")
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    assert all(len(line.split()) > 1 for line in lines)  # each with its description


def test_presets_show(capsys):
    out, _ = run_cli(capsys, "presets", "--show", "shakespeare-char")
    assert yaml.safe_load(out) == load_preset("shakespeare-char")
    assert "model" in yaml.safe_load(out)


def test_presets_show_unknown(capsys):
    assert main(["presets", "--show", "shakespeare"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'shakespeare-char'?" in err


def test_no_verb_is_a_usage_error(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("worldloom: error: choose a verb: presets, train")


# ---------------------------------------------------------------- train


def test_train(cli_run):
    ckpt = latest_checkpoint(cli_run)
    assert ckpt.name == "step-00000004"
    cfg = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert cfg["model"]["n_layer"] == 1 and cfg["model"]["d_model"] == 32 and cfg["name"] == "x"
    assert cfg["tokenizer"]["kind"] == "char"  # from the preset
    assert cfg["train"]["lr"] == load_preset("shakespeare-char")["train"]["lr"]  # preset field kept
    assert (cli_run / "loss.png").is_file()
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]


def test_train_prints_progress_lines(tmp_path, corpus_file, capsys):
    # the first word is an override: the default preset (babyai) switched to the text recipe
    out, _ = run_cli(capsys, "train", "recipe=text", *SMALL, f"out_dir={tmp_path}", "name=y", f"data.path={corpus_file}", "--no-progress")
    assert "step 2: train loss" in out and "step 4: train loss" in out and "done: step 4" in out


def test_train_options_between_overrides(tmp_path, corpus_file, capsys):
    """`train PRESET --no-progress key=value`: overrides after an option are still overrides."""
    run_cli(capsys, "train", "shakespeare-char", "--no-progress", *SMALL, f"out_dir={tmp_path}", "name=z",
            f"data.path={corpus_file}")
    assert latest_checkpoint(tmp_path / "z").name == "step-00000004"
    for extra in ("not-an-override", "--bogus"):  # anything else is still refused
        assert main(["train", "shakespeare-char", "--no-progress", extra]) == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and err.count("\n") == 1  # one line, no usage block
        assert err.startswith("worldloom: error:") and "--help" in err


def test_train_resume(cli_run, tmp_path, capsys):
    run = tmp_path / "x"
    shutil.copytree(cli_run, run)
    out, _ = run_cli(capsys, "train", "--resume", run, "train.max_steps=6", "--no-progress")
    assert "resuming at step 4" in out
    assert latest_checkpoint(run).name == "step-00000006"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6]
    # a preset and --resume together is refused in one line
    assert main(["train", "shakespeare-char", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_train_text_bpe_preset(tmp_path, corpus_file, capsys):
    run_cli(capsys, "train", "text-bpe", *SMALL, "tokenizer.vocab_size=300", "model.dropout=0.0", f"out_dir={tmp_path}",
            "name=bpe", f"data.path={corpus_file}", "--no-progress")
    run = load_run(tmp_path / "bpe")
    assert run.tokenizer.kind == "bpe" and run.tokenizer.vocab_size == 300
    assert run.cfg.model.vocab_size == 300 and run.state["step"] == 4
    out, _ = run_cli(capsys, "eval", tmp_path / "bpe", "--json")
    res = json.loads(out)
    assert math.isfinite(res["loss"]) and res["chars"] > res["tokens"]  # BPE tokens span several characters


# ---------------------------------------------------------------- generate


def test_generate_all_options(cli_run, capsys):
    argv = ["generate", cli_run, "The cat", "--max-new-tokens", "20", "--temperature", "0.9", "--top-p", "0.9",
            "--top-k", "20", "--stop", "\n", "--stop", "zz", "--seed", "3", "--num-samples", "2"]
    out, _ = run_cli(capsys, *argv)
    samples = out.split("--- sample ")[1:]
    assert [s.split("\n", 1)[0] for s in samples] == ["1", "2"]
    for s in samples:
        text = s.split("\n", 1)[1]
        assert text.startswith("The cat")
        completion = text[len("The cat"):].rstrip("\n")
        assert "\n" not in completion and "zz" not in completion  # cut at the stop strings
        assert len(completion) <= 20 * 4
    again, _ = run_cli(capsys, *argv)
    assert again == out  # --seed makes samples repeatable


def test_generate_greedy_streams_what_generate_returns(trained_run, capsys):
    out, _ = run_cli(capsys, "generate", trained_run, "The dog", "--max-new-tokens", "25", "--temperature", "0")
    run = load_run(trained_run)
    [expected] = generate(run.model, run.tokenizer, ["The dog"], SamplingConfig(max_new_tokens=25, temperature=0.0))
    assert out == "The dog" + expected + "\n"


def test_generate_bad_sampling_option_is_one_line(cli_run, capsys):
    assert main(["generate", str(cli_run), "The", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--top-p" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["", "--max-new-tokens", "3"], "prompt is empty"),
    (["The", "--num-samples", "0"], "--num-samples"),
    (["The", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["The", "--temperature", "-1"], "--temperature"),
    (["The", "--temperature", "nan"], "--temperature"),
    (["The", "--temperature", "inf"], "--temperature"),
    (["The", "--top-k", "-2"], "--top-k"),
    (["The", "--top-p", "nan"], "--top-p"),
])
def test_generate_bad_arguments_are_one_line(cli_run, capsys, argv, needle):
    capsys.readouterr()
    assert main(["generate", str(cli_run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


# ---------------------------------------------------------------- eval


def test_eval_json(trained_run, capsys):
    out, _ = run_cli(capsys, "eval", trained_run, "--json", "--batch-size", "8")
    res = json.loads(out)
    for key in ("loss", "perplexity", "bits_per_char", "nats_per_char"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-9)
    assert res["bits_per_char"] == pytest.approx(res["nats_per_char"] / math.log(2), rel=1e-9)
    # char tokenizer on this corpus: every held-out character is one token, so the figures agree
    assert res["tokens"] == res["chars"] - 1
    assert res["nats_per_char"] == pytest.approx(res["loss"] * res["tokens"] / res["chars"], rel=1e-9)
    assert res["loss"] < 3.0  # the trained model is far better than uniform (log vocab ~ 5.6)
    assert res["step"] == 80 and res["precision"] == "fp32"
    # the batch size changes nothing but the speed
    out2, _ = run_cli(capsys, "eval", trained_run, "--json", "--batch-size", "3")
    assert json.loads(out2)["loss"] == pytest.approx(res["loss"], rel=1e-5)


def test_eval_text_and_other_data(trained_run, tmp_path, corpus_text, capsys):
    out, _ = run_cli(capsys, "eval", trained_run)
    assert "perplexity" in out and "bits/char" in out
    other = tmp_path / "other.txt"
    other.write_text(corpus_text[::-1][:5000])
    out, _ = run_cli(capsys, "eval", trained_run, "--json", "--data", other)
    res = json.loads(out)
    assert res["data"] == str(other) and res["chars"] == 500


def test_eval_bad_batch_size_is_one_line(cli_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(cli_run), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size" in err


# ---------------------------------------------------------------- the installed command


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "worldloom"
    assert exe.is_file(), f"no console script at {exe}"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for verb in ("presets", "train", "generate", "eval", "export"):
        assert verb in proc.stdout


def test_denormals_are_flushed_after_startup():
    from worldloom.runtime import flush_denormals

    flush_denormals()
    tiny = torch.tensor([3e-39, 1e-30])  # the first is below fp32's smallest normal number (1.2e-38)
    assert (tiny * 1.0).tolist()[0] == 0.0 and (tiny * 1.0).tolist()[1] > 0.0


def test_threads_zero_follows_omp_num_threads_else_every_core(monkeypatch):
    from worldloom.runtime import default_threads, set_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    set_threads(0)
    assert torch.get_num_threads() == 3
    for unset in ("", "0", "two"):  # unset, zero or not a number: every core this process may use
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert default_threads() == len(os.sched_getaffinity(0))
    set_threads(1)
