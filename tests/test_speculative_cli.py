"""`worldloom generate --draft / --lookup`: the same greedy text as plain generate, the closing
tokens/s and acceptance line, one-line refusals."""

from __future__ import annotations

import pytest

from test_cli import SMALL, run_cli
from worldloom.cli import main


def test_draft_and_lookup_print_the_plain_greedy_text(trained_run, capsys):
    argv = ["generate", trained_run, "The dog and the cat", "--max-new-tokens", "40", "--temperature", "0"]
    plain, err = run_cli(capsys, *argv)
    assert "tokens/s" in err and "verifications" not in err
    for extra in (["--draft", str(trained_run)], ["--lookup", "--draft-tokens", "6"]):
        out, err = run_cli(capsys, *argv, *extra)
        assert out == plain
        assert "verifications" in err and "mean accepted length" in err and err.count("\n") == 1
    out, err = run_cli(capsys, *argv, "--draft", str(trained_run))
    assert "drafts accepted 100%" in err  # the target as its own draft agrees everywhere
    out, err = run_cli(capsys, *argv, "--quiet")
    assert out == plain and err == ""


def test_sampled_speculative_is_repeatable_with_a_seed(trained_run, capsys):
    argv = ["generate", trained_run, "The", "--max-new-tokens", "30", "--seed", "3", "--lookup", "--num-samples", "2"]
    a, _ = run_cli(capsys, *argv)
    b, _ = run_cli(capsys, *argv)
    assert a == b and a.count("--- sample") == 2


@pytest.fixture(scope="module")
def other_tokenizer_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other")
    data = folder / "digits.txt"
    data.write_text("0123456789 " * 400, encoding="utf-8")
    assert main(["train", "shakespeare-char", *SMALL, f"out_dir={folder}", "name=d", f"data.path={data}", "--no-progress"]) == 0
    return folder / "d"


@pytest.mark.parametrize("extra, needle", [
    (["--lookup", "--draft", "SELF"], "choose one"),
    (["--lookup", "--compile"], "drop --compile"),
    (["--draft", "OTHER"], "another tokenizer"),
    (["--draft", "MISSING"], "MISSING"),
    (["--lookup", "--draft-tokens", "0"], "--draft-tokens"),
])
def test_refusals_are_one_line(trained_run, other_tokenizer_run, tmp_path, capsys, extra, needle):
    names = {"SELF": str(trained_run), "OTHER": str(other_tokenizer_run), "MISSING": str(tmp_path / "MISSING")}
    extra = [names.get(a, a) for a in extra]
    capsys.readouterr()
    assert main(["generate", str(trained_run), "The", "--max-new-tokens", "5", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
