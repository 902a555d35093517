"""What a user can get wrong, or what a kill can leave behind: one-line errors, never a traceback.

Each case is checked twice: through the Python API (the exact WorldloomError subclass, a
one-line message) and through `worldloom.cli.main` (status 2, one line on stderr).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import worldloom.checkpoint as checkpoint_mod
import worldloom.train.loop as loop
from worldloom.cli import main
from worldloom.config import build_config
from worldloom.errors import CheckpointError, ConfigError, DataError, WorldloomError
from worldloom.io import load_tensors
from worldloom.run import load_run
from worldloom.train import train
from worldloom.checkpoint import latest_checkpoint, save_checkpoint
from worldloom.train.optim import make_optimizer

from conftest import TINY, TRAINED_STEPS

QUIET = dict(progress=False, log=lambda *a: None)


def api_error(cls, fn, *args, **kw) -> str:
    with pytest.raises(cls) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    assert isinstance(e.value, WorldloomError)
    return msg


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("worldloom: error: "), err
    return lines[0]


def cli_train_args(data, out_dir, name="x"):
    return ["train", "shakespeare-char", *TINY, f"data.path={data}", f"out_dir={out_dir}", f"name={name}", "--no-progress"]


# ---------------------------------------------------------------- data


def test_missing_data_file(tiny_cfg, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert "not found" in api_error(DataError, train, tiny_cfg(data=missing), **QUIET)
    assert "not found" in cli_error(capsys, cli_train_args(missing, tmp_path / "runs"))
    assert not (tmp_path / "runs" / "x").exists()  # nothing half-made


def test_no_data_path(tmp_path, capsys):
    assert "data.path" in cli_error(capsys, ["train", "shakespeare-char", *TINY, f"out_dir={tmp_path}", "--no-progress"])


@pytest.mark.parametrize("content", ["", "  \n\n\t "])
def test_empty_corpus(tiny_cfg, tmp_path, capsys, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    assert "empty" in api_error(DataError, train, tiny_cfg(data=path), **QUIET)
    assert "empty" in cli_error(capsys, cli_train_args(path, tmp_path / "runs"))


def test_corpus_shorter_than_context(tiny_cfg, tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("The cat sat on the mat.\n" * 3)  # 72 chars: 7 held out, context is 32
    msg = api_error(DataError, train, tiny_cfg(data=path), **QUIET)
    assert "model.context" in msg and "fewer than" in msg
    assert "model.context" in cli_error(capsys, cli_train_args(path, tmp_path / "runs"))


def test_corpus_not_utf8_or_a_folder(tiny_cfg, tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    assert "UTF-8" in api_error(DataError, train, tiny_cfg(data=path), **QUIET)
    assert "UTF-8" in cli_error(capsys, cli_train_args(path, tmp_path / "runs"))
    assert "folder" in api_error(DataError, train, tiny_cfg(data=tmp_path), **QUIET)


# ---------------------------------------------------------------- damaged checkpoints


def all_verbs_fail(capsys, run_dir, needle):
    """load_run, generate, eval, export and train --resume all refuse the run with `needle`."""
    assert needle in api_error(CheckpointError, load_run, run_dir)
    assert needle in cli_error(capsys, ["generate", run_dir, "The", "--max-new-tokens", "3"])
    assert needle in cli_error(capsys, ["eval", run_dir, "--json"])
    assert needle in cli_error(capsys, ["train", "--resume", run_dir, "--no-progress"])


def test_truncated_model_weights(run_copy, capsys):
    f = latest_checkpoint(run_copy) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    all_verbs_fail(capsys, run_copy, "corrupt or truncated")


def test_truncated_optimizer_state(run_copy, capsys):
    f = latest_checkpoint(run_copy) / "optimizer.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert load_run(run_copy).state["step"] == TRAINED_STEPS  # generation does not need it
    assert "optimizer state" in api_error(CheckpointError, train, resume=run_copy, overrides=["train.max_steps=90"], **QUIET)
    assert "corrupt" in cli_error(capsys, ["train", "--resume", run_copy, "train.max_steps=90", "--no-progress"])


def test_garbage_model_weights(run_copy, capsys):
    (latest_checkpoint(run_copy) / "model.safetensors").write_bytes(b"\x00" * 64)
    all_verbs_fail(capsys, run_copy, "corrupt")


@pytest.mark.parametrize("content", ['{"step": 80, "form', "", "not json at all", "\xff\xfe"])
def test_corrupt_state_json(run_copy, capsys, content):
    (latest_checkpoint(run_copy) / "state.json").write_text(content, encoding="latin-1")
    all_verbs_fail(capsys, run_copy, "corrupt")


def test_state_json_of_another_format(run_copy, capsys):
    f = latest_checkpoint(run_copy) / "state.json"
    state = json.loads(f.read_text())
    state["format"] = "something-else/9"
    f.write_text(json.dumps(state))
    all_verbs_fail(capsys, run_copy, "not a worldloom checkpoint")


def edit_config(run_dir, **model):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"].update(model)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("change", [dict(n_layer=1), dict(n_layer=3), dict(d_model=64), dict(n_kv_head=4), dict(d_ff=64),
                                    dict(tie_weights=False)], ids=lambda c: "{}={}".format(*next(iter(c.items()))))
def test_checkpoint_of_another_architecture(run_copy, capsys, change):
    edit_config(run_copy, **change)
    all_verbs_fail(capsys, run_copy, "another architecture")


def test_tokenizer_of_another_size(run_copy, capsys):
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    edit_config(run_copy, vocab_size=cfg["model"]["vocab_size"] + 1)
    assert "tokens but the model config says" in api_error(CheckpointError, load_run, run_copy)
    assert "tokens" in cli_error(capsys, ["generate", run_copy, "The"])


def test_corrupt_or_missing_tokenizer(run_copy, capsys):
    tok = run_copy / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text()[:200])
    assert "corrupt" in api_error(CheckpointError, load_run, run_copy)
    assert "corrupt" in cli_error(capsys, ["eval", run_copy])
    tok.unlink()
    assert "not found" in api_error(CheckpointError, load_run, run_copy)


def test_invalid_config_yaml(run_copy, capsys):
    (run_copy / "config.yaml").write_text("model: [1, 2\n")
    assert "not valid YAML" in api_error(CheckpointError, load_run, run_copy)
    (run_copy / "config.yaml").write_text("model:\n  n_layers: 2\n")
    assert "n_layers" in api_error(CheckpointError, load_run, run_copy)
    assert "n_layers" in cli_error(capsys, ["generate", run_copy, "The"])


def test_pointer_to_missing_or_corrupt_checkpoint(run_copy, capsys):
    (run_copy / "checkpoint.json").write_text(json.dumps({"latest": "checkpoints/step-99999999"}))
    all_verbs_fail(capsys, run_copy, "does not exist")
    (run_copy / "checkpoint.json").write_text("{")
    all_verbs_fail(capsys, run_copy, "corrupt")


def test_run_folder_without_checkpoint(tiny_cfg, monkeypatch, capsys):
    """A run killed before its first checkpoint: it has a config, a tokenizer, no checkpoint."""
    cfg = tiny_cfg()

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.LWM, "forward", die)
    msg = api_error(CheckpointError, train, cfg, **QUIET)
    assert "interrupted at step 0" in msg and "last checkpoint: none" in msg
    monkeypatch.undo()
    run_dir = cfg.run_dir
    assert (run_dir / "config.yaml").is_file() and latest_checkpoint(run_dir) is None
    assert "no checkpoint" in api_error(CheckpointError, load_run, run_dir)
    assert "no checkpoint" in api_error(CheckpointError, train, resume=run_dir, **QUIET)
    assert "no checkpoint" in cli_error(capsys, ["generate", run_dir, "The"])
    assert "no checkpoint" in cli_error(capsys, ["eval", run_dir])
    assert "no checkpoint" in cli_error(capsys, ["train", "--resume", run_dir, "--no-progress"])
    # and it can simply be started again (no checkpoint: not "an existing run")
    assert train(cfg, **QUIET)["step"] == cfg.train.max_steps


def test_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "notarun"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    all_verbs_fail(capsys, folder, "not a worldloom run folder")


def test_run_folder_that_does_not_exist(tmp_path, capsys):
    all_verbs_fail(capsys, tmp_path / "missing", "run folder not found")


# ---------------------------------------------------------------- a kill during save_checkpoint


def test_kill_during_save_checkpoint_keeps_previous_checkpoint(run_copy, monkeypatch):
    run = load_run(run_copy)
    old_ckpt = latest_checkpoint(run_copy)
    old_weights = load_tensors(old_ckpt / "model.safetensors")

    model, opt = run.model.train(), make_optimizer(run.model, run.cfg.train)
    x = torch.randint(0, run.cfg.model.vocab_size, (2, run.cfg.model.context + 1))
    model(x[:, :-1]).logits.logsumexp(-1).mean().backward()
    opt.step()  # new weights and optimizer moments, different from the checkpoint's

    real_save, calls = checkpoint_mod.save_tensors, []

    def dies_on_second_call(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:  # the weights are written, the optimizer state is not
            raise KeyboardInterrupt
        return real_save(*a, **k)

    monkeypatch.setattr(checkpoint_mod, "save_tensors", dies_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run_copy, model, opt, {"step": TRAINED_STEPS + 10, "elapsed": 1.0})
    monkeypatch.undo()
    assert len(calls) == 2

    assert latest_checkpoint(run_copy) == old_ckpt
    again = load_run(run_copy)
    assert again.state["step"] == TRAINED_STEPS
    for k, v in again.model.state_dict().items():
        if k in old_weights:
            assert torch.equal(v, old_weights[k]), k
    assert not (run_copy / "checkpoints" / f"step-{TRAINED_STEPS + 10:08d}").exists()

    # the half-written folder does not stop the next save, nor a resume
    new = save_checkpoint(run_copy, model, opt, {"step": TRAINED_STEPS + 10, "elapsed": 1.0, "precision": "fp32",
                                                  "val_loss": None, "data_rng": again.state["data_rng"],
                                                  "torch_rng": again.state["torch_rng"]})
    assert latest_checkpoint(run_copy) == new
    assert [p.name for p in (run_copy / "checkpoints").iterdir()] == [new.name]
    assert train(resume=run_copy, overrides=[f"train.max_steps={TRAINED_STEPS + 12}"], **QUIET)["step"] == TRAINED_STEPS + 12


def test_kill_before_pointer_update_keeps_previous_checkpoint(run_copy, monkeypatch):
    """The new folder is complete but checkpoint.json still names the old one: the old one loads."""
    run = load_run(run_copy)
    old_ckpt = latest_checkpoint(run_copy)

    real_write = checkpoint_mod.write_json

    def dies_on_pointer(path, obj):
        if path.name == "checkpoint.json":
            raise KeyboardInterrupt
        return real_write(path, obj)

    monkeypatch.setattr(checkpoint_mod, "write_json", dies_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run_copy, run.model, None, {"step": TRAINED_STEPS + 5})
    monkeypatch.undo()
    assert latest_checkpoint(run_copy) == old_ckpt
    assert load_run(run_copy).state["step"] == TRAINED_STEPS


def test_kill_while_replacing_the_same_step_keeps_one_whole(run_copy, monkeypatch):
    """Saving a step that already has a checkpoint: a kill after the old folder is moved aside but
    before the new one is in place leaves the old one, which the next load takes back."""
    run = load_run(run_copy)
    old_ckpt = latest_checkpoint(run_copy)
    step = int(old_ckpt.name.split("-")[1])
    real_rename, calls = type(old_ckpt).rename, []

    def dies_on_second_rename(self, target):
        calls.append(self.name)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(type(old_ckpt), "rename", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run_copy, run.model, None, {"step": step})
    monkeypatch.undo()
    assert calls == [old_ckpt.name, f".{old_ckpt.name}.tmp"]
    assert not old_ckpt.exists()  # the window this test is about
    assert latest_checkpoint(run_copy) == old_ckpt and old_ckpt.is_dir()
    assert load_run(run_copy).state["step"] == step
    again = save_checkpoint(run_copy, run.model, None, {"step": step})  # and saving the step again works
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == [again.name]


def test_cli_interrupt_is_one_line(tiny_cfg, tmp_path, corpus_file, monkeypatch, capsys):
    """Ctrl-C during `worldloom train`: one line naming the last checkpoint and how to resume."""
    real_append = loop._append

    def append_then_die(path, row):
        real_append(path, row)
        if row.get("step") == 6 and "loss" in row:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_append", append_then_die)
    line = cli_error(capsys, cli_train_args(corpus_file, tmp_path / "runs"))
    assert "interrupted at step 6" in line and "step-00000004" in line and "--resume" in line


def test_config_errors_on_the_command_line(tmp_path, corpus_file, capsys):
    line = cli_error(capsys, [*cli_train_args(corpus_file, tmp_path), "model.n_layers=2"])
    assert "did you mean 'model.n_layer'?" in line
    assert "must be int" in cli_error(capsys, [*cli_train_args(corpus_file, tmp_path), "model.n_layer=abc"])
    assert "must be float" in cli_error(capsys, [*cli_train_args(corpus_file, tmp_path), "train.lr=[1]"])
    assert "did you mean" in cli_error(capsys, ["train", "shakespeare-chr", "--no-progress"])
    assert "fp16" in cli_error(capsys, [*cli_train_args(corpus_file, tmp_path), "train.precision=fp16"])
    assert "fp16" in api_error(ConfigError, train, build_config(None, [*TINY, f"data.path={corpus_file}", f"out_dir={tmp_path}",
                                                                       "train.precision=fp16"]), **QUIET)


def test_prompt_that_is_not_unicode_is_one_line(trained_run, capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates; they must not end in a traceback."""
    line = cli_error(capsys, ["generate", trained_run, "ab\udcff", "--max-new-tokens", "2"])
    assert "not valid Unicode" in line and "UTF-8" in line


def test_stale_temporary_checkpoint_folders_are_removed(run_copy):
    run = load_run(run_copy)
    stale = run_copy / "checkpoints" / ".step-00000999.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    new = save_checkpoint(run_copy, run.model, None, {"step": TRAINED_STEPS + 1})
    assert not stale.exists()
    assert [p.name for p in (run_copy / "checkpoints").iterdir()] == [new.name]



def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a 0600 temp file; the final file has the mode open() would give it."""
    import os

    from worldloom.io import atomic_write_bytes

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    with open(tmp_path / "b.json", "wb") as f:
        f.write(b"{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "a.json").read_bytes() == b"{}"


def test_atomic_write_never_replaces_a_device_or_a_folder(tmp_path):
    """A rename onto /dev/null would leave a plain file in the device's place (as root: for the whole machine;
    a hostile-config test once did this): anything but a regular file at the path is refused, untouched."""
    import stat
    from pathlib import Path

    from worldloom.errors import WorldloomError
    from worldloom.io import atomic_write_bytes

    for path in (Path("/dev/null"), tmp_path):
        mode = path.stat().st_mode
        with pytest.raises(WorldloomError, match="not a regular file"):
            atomic_write_bytes(path, b"x")
        assert path.stat().st_mode == mode
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)
    atomic_write_bytes(tmp_path / "f.bin", b"x")  # a new file, then a regular file replaced: as ever
    atomic_write_bytes(tmp_path / "f.bin", b"y")
    assert (tmp_path / "f.bin").read_bytes() == b"y"
