"""The CLI probed as a hostile new user would: random values at every config field and every flag.

The property: a command either works, or exits with status 2 and exactly one line on stderr,
``worldloom: error: ...`` (never a traceback); and nothing is written outside the run
folder or the output the command was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from worldloom.checkpoint import latest_checkpoint
from worldloom.cli import main
from worldloom.config import RunConfig, build_config
from worldloom.errors import ConfigError

from conftest import TINY

FAST = settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run_main(capsys, argv) -> tuple[int, str, str]:
    """main(argv) -> (status, stdout, stderr), asserting the property's error half."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    with contextlib.suppress(InvalidArgument):  # outside a property test there are no statistics
        event(f"status {rc}")  # --hypothesis-show-statistics: how many examples worked
    if rc != 0:
        assert rc == 2, (rc, err)
        assert err.count("\n") == 1 and err.startswith("worldloom: error: "), err
    return rc, out, err


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames + dirnames:
                p = os.path.join(dirpath, name)
                st_ = os.lstat(p)
                files[p] = (st_.st_size, st_.st_mtime_ns) if name in filenames else (0, 0)
    return files


def written(before: dict, after: dict) -> list[str]:
    return sorted(p for p in after if before.get(p) != after[p])


def assert_written_only_under(before, after, *allowed: Path):
    allowed_s = [os.path.abspath(a) for a in allowed]
    parents = {str(q) for a in allowed_s for q in Path(a).parents}  # folders made on the way (out_dir)
    stray = [p for p in written(before, after)
             if not any(p == a or p.startswith(a + os.sep) for a in allowed_s) and not (p in parents and os.path.isdir(p))]
    assert not stray, stray


def run_in(sandbox: Path, capsys, argv, *watch: Path) -> tuple[int, dict, dict]:
    """run_main with `sandbox` as the working folder -> (status, files before, files after) of sandbox + watch."""
    before = snapshot(sandbox, *watch)
    cwd = os.getcwd()
    os.chdir(sandbox)
    try:
        rc, _, _ = run_main(capsys, argv)
    finally:
        os.chdir(cwd)
    return rc, before, snapshot(sandbox, *watch)


def all_fields():
    """Every config key as group.field (or a top-level field) with its type."""
    out = []
    for f in dataclasses.fields(RunConfig):
        tp = typing.get_type_hints(RunConfig)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(f"{f.name}.{g.name}", typing.get_type_hints(tp)[g.name]) for g in dataclasses.fields(tp)]
        else:
            out.append((f.name, tp))
    return out


FIELDS = all_fields()
HOSTILE_TEXT = st.sampled_from(["", " ", "nan", ".nan", ".inf", "-.inf", "1e400", "-1", "0", "null", "[1, 2]", "{a: 1}",
                                "~", "yes", "..", ".", "/", "../../x", "a/b", "x" * 300, "é", "\\", "'", '"', "1_000",
                                "0x10", "99999999999999999999999", "-99999999999999999999999", "3e-4", "/dev/null"])


def value_text(tp, absurd: bool = True) -> st.SearchStrategy[str]:
    """Text a user might type after key= for a field of type tp (absurd: also huge in-range integers)."""
    ints = [st.integers(-3, 16), st.integers(2**63, 2**80), st.integers(-(2**80), -(2**63))]
    if absurd:
        ints.append(st.integers(2**31, 2**63 - 1))
    numbers = st.one_of(*ints).map(str) | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False).map(repr)
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
    by_type = {int: numbers, float: numbers, bool: st.sampled_from(["true", "false", "1", "maybe"]) | numbers, str: text}
    return st.one_of(by_type.get(tp, text), HOSTILE_TEXT)


# ---------------------------------------------------------------- config fields


@FAST
@given(data=st.data())
def test_every_config_field_is_valid_or_a_config_error(data):
    key, tp = data.draw(st.sampled_from(FIELDS), label="field")
    text = data.draw(value_text(tp), label="value")
    for preset in ("shakespeare-char", "babyai"):
        try:
            cfg = build_config(preset, [f"{key}={text}"])
        except ConfigError as e:
            assert str(e) and "\n" not in str(e)
            continue
        assert cfg.run_dir.parent == Path(cfg.out_dir) and cfg.run_dir.name == cfg.name  # one path component


# A text run is cheap; these keys decide how much work a training run is, so absurd in-range
# values (which would only be slow, not wrong) are left out for them.
WORK = {"train.max_steps", "train.eval_batches", "train.grad_accum", "tokenizer.vocab_size", "train.max_minutes",
        "model.n_layer", "model.context", "model.d_model", "model.d_ff", "model.moe_experts", "model.mamba_d_state",
        "model.mamba2_d_state", "model.mamba_expand", "model.n_head", "train.batch_size", "model.chunk"}
TEXT_FIELDS = [(k, tp) for k, tp in FIELDS if k.split(".")[0] in ("name", "out_dir", "data", "tokenizer", "model", "train")
               and k not in ("model.backbone", "model.layers", "data.path", "train.device")]


@SLOW
@given(data=st.data())
def test_training_with_a_random_field_works_or_fails_in_one_line(data, corpus_file, tmp_path_factory, capsys):
    key, tp = data.draw(st.sampled_from(TEXT_FIELDS), label="field")
    text = data.draw(value_text(tp, absurd=key not in WORK), label="value")
    sandbox = tmp_path_factory.mktemp("sandbox")
    args = ["train", "shakespeare-char", *TINY, "train.max_steps=3", "train.eval_interval=2", f"data.path={corpus_file}",
            "out_dir=runs", "name=r", f"{key}={text}", "--no-progress"]
    rc, before, after = run_in(sandbox, capsys, args)
    try:
        cfg = build_config("shakespeare-char", args[2:-1])
        allowed = sandbox / cfg.run_dir
    except ConfigError:
        allowed = None
    assert_written_only_under(before, after, *([allowed] if allowed else []))
    if rc == 0:
        assert allowed is not None and latest_checkpoint(allowed) is not None


# ---------------------------------------------------------------- CLI flags

FLAG_VALUE = st.one_of(st.integers(-3, 30).map(str), st.integers(10**8, 10**30).map(str),
                       st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False).map(repr), HOSTILE_TEXT,
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8))
TEXT_FLAGS = {
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--precision", "--stop", "--num-samples",
                 "--draft", "--draft-tokens"],
    "eval": ["--batch-size", "--precision", "--data"],
}


@FAST
@given(data=st.data())
def test_every_text_verb_flag_works_or_fails_in_one_line(data, trained_run, tmp_path_factory, capsys):
    verb = data.draw(st.sampled_from(sorted(TEXT_FLAGS)), label="verb")
    flags = data.draw(st.lists(st.sampled_from(TEXT_FLAGS[verb]), min_size=1, max_size=3, unique=True), label="flags")
    argv = [verb, trained_run] + (["The"] if verb == "generate" else [])
    for flag in flags:
        argv += [flag, data.draw(FLAG_VALUE, label=flag)]
    if verb == "generate" and "--max-new-tokens" not in flags:
        argv += ["--max-new-tokens", "4"]
    _, before, after = run_in(tmp_path_factory.mktemp("sandbox"), capsys, argv, trained_run)
    assert_written_only_under(before, after)  # generate and eval of a text run write nothing


SMALL_OR_HOSTILE = st.one_of(st.integers(-3, 4).map(str), st.integers(10**8, 10**30).map(str), HOSTILE_TEXT)


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--seed", "--steps", "--out"]), value=SMALL_OR_HOSTILE)
def test_imagine_flags_work_or_fail_in_one_line(flag, value, world_run, tmp_path_factory, capsys):
    sandbox = tmp_path_factory.mktemp("sandbox")
    argv = ["imagine", world_run, flag, value] + (["--steps", "3"] if flag != "--steps" else [])
    rc, before, after = run_in(sandbox, capsys, argv, world_run)
    out = sandbox / (value if flag == "--out" else "rollout.gif")
    assert_written_only_under(before, after, out)
    if rc == 0:
        assert out.is_file()


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=st.sampled_from(["presets", "export", "collect"]), value=SMALL_OR_HOSTILE)
def test_presets_export_collect_arguments_work_or_fail_in_one_line(verb, value, trained_run, tmp_path_factory, capsys):
    sandbox = tmp_path_factory.mktemp("sandbox")
    if verb != "presets" and (value.startswith("/") or ".." in value):
        value = "o/" + value.replace("..", "dd")  # kept inside the sandbox: `collect --out /` would really write there
    argv = {"presets": ["presets", "--show", value],
            "export": ["export", "hf", trained_run, value],
            "collect": ["collect", "data.episodes=2", "data.val_episodes=1", "data.workers=1", "--out", value, "--no-progress"]}[verb]
    _, before, after = run_in(sandbox, capsys, argv, trained_run)
    assert_written_only_under(before, after, *([] if verb == "presets" else [sandbox / value]))


# ---------------------------------------------------------------- the holes found by probing, one by one


def train_argv(corpus_file, out_dir, *extra):
    return ["train", "shakespeare-char", *TINY, f"data.path={corpus_file}", f"out_dir={out_dir}", *extra, "--no-progress"]


@pytest.mark.parametrize("name", ["../../escape", "", ".", "..", "a/b", "/abs", "a\\b", "x" * 256])
def test_run_name_is_one_path_component(name, corpus_file, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "runs"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text("mine: true\n")  # a user's own files in out_dir must survive
    before = snapshot(tmp_path)
    rc, _, err = run_main(capsys, train_argv(corpus_file, out, f"name={name}"))
    assert rc == 2 and "name" in err
    assert snapshot(tmp_path) == before


def test_run_folder_that_is_a_file_is_refused(corpus_file, tmp_path, capsys):
    (tmp_path / "r").write_text("not a folder")
    rc, _, err = run_main(capsys, train_argv(corpus_file, tmp_path, "name=r"))
    assert rc == 2 and "is a file" in err
    assert (tmp_path / "r").read_text() == "not a folder"


@pytest.mark.parametrize("latest", ["../other/checkpoints/step-00000080", "/tmp", "checkpoints/../../other/checkpoints/step-00000080",
                                    "checkpoints/step-00000080/..", 7, None, "checkpoints"])
def test_checkpoint_pointer_must_stay_in_the_run(latest, run_copy, capsys):
    other = run_copy.parent / "other"
    other.mkdir()
    (other / "checkpoints").mkdir()
    (run_copy / "checkpoints").rename(other / "checkpoints" / "x")  # the weights now live in another folder only
    (other / "checkpoints" / "x").rename(other / "checkpoints" / "step-00000080-tmp")
    (other / "checkpoints" / "step-00000080-tmp").rename(other / "checkpoints" / "step-00000080")
    (run_copy / "checkpoint.json").write_text(json.dumps({"latest": latest}))
    for argv in (["generate", run_copy, "The", "--max-new-tokens", "2"], ["eval", run_copy],
                 ["train", "--resume", run_copy, "--no-progress"]):
        rc, _, err = run_main(capsys, argv)
        assert rc == 2 and "checkpoint.json" in err


def test_symlinked_checkpoint_into_another_run_is_refused(run_copy, capsys):
    ckpt = latest_checkpoint(run_copy)
    elsewhere = run_copy.parent / "elsewhere"
    ckpt.rename(elsewhere)
    ckpt.symlink_to(elsewhere, target_is_directory=True)
    rc, _, err = run_main(capsys, ["eval", run_copy])
    assert rc == 2 and "outside" in err


@pytest.mark.parametrize("override", ["model.d_model=1000000", "train.batch_size=100000000",
                                      "model.n_layer=99999999999999999999999", "model.n_layer=1000000"])
def test_sizes_that_cannot_fit_are_refused_before_anything_is_written(override, corpus_file, tmp_path, capsys):
    before = snapshot(tmp_path)
    rc, _, err = run_main(capsys, train_argv(corpus_file, tmp_path / "runs", "name=big", override))
    assert rc == 2
    assert ("GiB" in err) or ("range" in err) or ("beyond" in err)
    assert snapshot(tmp_path) == before


def test_allocation_failure_is_one_line(corpus_file, tmp_path, monkeypatch, capsys):
    import worldloom.memory as memory
    import worldloom.train.loop as loop

    monkeypatch.setattr(memory, "machine_bytes", lambda device: None)  # the estimate cannot run: the allocator says no

    def refuse(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(loop, "LWM", refuse)
    rc, _, err = run_main(capsys, train_argv(corpus_file, tmp_path, "name=oom"))
    assert rc == 2 and "out of memory" in err


@pytest.mark.parametrize("out_dir", ["/proc", "{file}/below"])
def test_odd_output_places_are_one_line(out_dir, corpus_file, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_main(capsys, train_argv(corpus_file, out_dir.format(file=f), "name=r"))
    assert rc == 2 and "cannot use" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(corpus_file, tmp_path, world_run, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert run_main(capsys, train_argv(corpus_file, ro, "name=r"))[0] == 2
        assert run_main(capsys, ["imagine", world_run, "--steps", "2", "--out", ro / "x.gif"])[0] == 2
        assert run_main(capsys, ["collect", "data.episodes=2", "data.val_episodes=1", "data.workers=1", "--out", ro / "d",
                                 "--no-progress"])[0] == 2
    finally:
        ro.chmod(0o755)


def test_imagine_and_collect_into_an_odd_place_are_one_line(world_run, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run_main(capsys, ["imagine", world_run, "--steps", "2", "--out", f / "x.gif"])[0] == 2
    assert run_main(capsys, ["imagine", world_run, "--steps", "2", "--out", tmp_path])[0] == 2
    assert run_main(capsys, ["collect", "data.episodes=2", "data.val_episodes=1", "data.workers=1", "--out", f / "d",
                             "--no-progress"])[0] == 2
    assert f.read_text() == "x"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e-300"])
def test_generate_temperature_must_be_a_usable_number(value, trained_run, capsys):
    rc, out, err = run_main(capsys, ["generate", trained_run, "The", "--temperature", value])
    assert rc == 2 and "--temperature" in err and out == ""


def test_data_path_that_is_a_device_says_so(corpus_file, tmp_path, capsys):
    rc, _, err = run_main(capsys, train_argv(corpus_file, tmp_path, "name=r", "data.path=/dev/null"))
    assert rc == 2 and "a device" in err and "folder" not in err


def test_resume_with_max_steps_below_the_checkpoint_changes_nothing(trained_run, run_copy, capsys):
    files = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    rc, _, err = run_main(capsys, ["train", "--resume", run_copy, "train.max_steps=5", "--no-progress"])
    assert rc == 2 and "max_steps" in err and "80" in err
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == files
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["max_steps"] == 80


@pytest.mark.parametrize("argv", [["generate"], ["generate", "x", "y", "--top-k", "many"], ["eval", "--bogus"],
                                  ["train", "--resume"], ["presets", "extra"], ["export", "onnx", "a", "b"], ["nope"]])
def test_usage_errors_of_every_verb_start_with_worldloom_error(argv, capsys):
    rc, _, err = run_main(capsys, argv)
    assert rc == 2 and err.startswith("worldloom: error: ")


def test_help_is_stdout_and_status_0(capsys):
    for argv in (["--help"], ["train", "--help"], ["generate", "--help"]):
        rc, out, err = run_main(capsys, argv)
        assert rc == 0 and "usage: worldloom" in out and err == ""


@pytest.mark.parametrize("edit", [{"data_rng": "!!not base64"}, {"torch_rng": "AAAA"}, {"step": "eighty"}, {"step": -1},
                                  {"elapsed": None}, {"precision": "fp64"}, {"optimizer_groups": None},
                                  {"clock": {"at": "x"}}, {"clock": [1]}])
def test_hand_edited_state_json_is_one_line(edit, run_copy, capsys):
    path = latest_checkpoint(run_copy) / "state.json"
    state = json.loads(path.read_text())
    state.update(edit)
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not None}))
    rc, _, err = run_main(capsys, ["train", "--resume", run_copy, "train.max_steps=90", "--no-progress"])
    assert rc == 2 and "state" in err
