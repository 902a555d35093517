"""write_report: report.md with the headline figures and linked plots, whatever the result dict holds."""

from __future__ import annotations

import json
import re

import pytest

from worldloom.world.eval.report import DASH, PLOTS, write_report

FULL = {
    "run": "gotolocal-small", "env_id": "BabyAI-GoToLocal-v0", "step": 12000, "minutes": 41.5, "params": 3_210_000,
    "machine": "2x CPU test box",
    "real": {"episodes": 500, "success": 0.97, "mean_return": 0.8123, "mean_length": 6.14, "seeds": [2000000, 2000499]},
    "plan": {"episodes": 100, "success": 0.98, "mean_return": 0.85, "horizon": 4, "seconds": 12.0},
    "world_model": {
        "expert": {"frame": 0.961, "token": 0.995, "reward": 1.0, "done": 0.999, "action": 0.95, "frame_parallel": 0.9,
                   "frame_n": 2000},
        "perturbed": {"frame": 0.80, "token": 0.98, "reward": 0.99, "done": 0.98, "frame_n": 2000},
        "after_random": {"frame": 0.523, "token": 0.93, "frame_n": 311},
    },
    "open_loop": {"horizons": {"1": {"frame": 0.95, "cell": 0.999, "n": 200}, "5": {"frame": 0.7, "cell": 0.98, "n": 180},
                               "10": {"frame": 0.41, "cell": 0.95, "n": 120}},
                  "curve": [{"k": k, "frame": 0.95 - 0.05 * k, "cell": 1 - 0.005 * k, "n": 200 - k} for k in range(1, 11)]},
    "timing": {"collect_s": 30.0, "train_s": 2490.0, "eval_s": 95.0},
}


def fake_metrics(run_dir, frame: bool = True, rl: bool = False):
    rows = []
    for s in range(1, 41):
        row = {"step": s, "loss": 5 / s, "loss_obs": 4 / s, "loss_action": 2 / s, "loss_reward": 0.5 / s,
               "loss_done": 0.3 / s, "lr": 1e-3, "tokens_per_s": 1e4, "elapsed": s * 0.1}
        if frame:
            row["loss_frame"] = 6 / s
        rows.append(json.dumps(row))
        if s % 10 == 0:
            rows.append(json.dumps({"step": s, "val_loss": 5.5 / s, "elapsed": s * 0.1}))
    if rl:  # the RL stage's rows: one per update
        rows += [json.dumps({"rl_update": u, "success": 0.8 + 0.01 * u, "episodes": 64 * u}) for u in range(1, 11)]
    rows.append('{"step": 41, "loss": 0.1')  # a line cut mid-write
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def linked_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_full_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fake_metrics(run, rl=True)
    gif = run / "episode.gif"
    gif.write_bytes(b"GIF89a")
    path = write_report(run, FULL, gif=gif)
    assert path == run / "report.md"
    md = path.read_text()
    assert "BabyAI-GoToLocal-v0" in md and "gotolocal-small" in md
    for figure in ("97.0%", "98.0%", "0.812", "6.1", "96.1%", "80.0%", "52.3%", "99.5%", "90.0%", "95.0%",
                   "70.0%", "41.0%", "12,000", "41.5", "3.21M", "2x CPU test box", "2,000,000–2,000,499", "horizon 4"):
        assert figure in md, figure
    links = linked_images(md)
    assert set(PLOTS.values()) <= set(links) and "episode.gif" in links
    for name in PLOTS.values():
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "How measured" in md and "never used for training" in md
    assert not list(run.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_gif_outside_the_run_folder_gets_a_relative_link(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    gif = tmp_path / "media" / "play.gif"
    gif.parent.mkdir()
    gif.write_bytes(b"GIF89a")
    md = write_report(run, FULL, gif=gif).read_text()
    assert "../../media/play.gif" in linked_images(md)


@pytest.mark.parametrize("result", [
    {},
    {"run": "bare"},
    {"env_id": "BabyAI-GoToLocal-v0", "real": {"success": 0.5}, "world_model": {"expert": {"frame": 0.9}}},
    {"real": None, "plan": "oops", "world_model": {"expert": None}, "open_loop": {"curve": [{"k": 1}, "x", {"exact": 1}]},
     "timing": {}, "params": "many", "minutes": float("nan")},
])
def test_missing_keys_never_crash(tmp_path, result):
    run = tmp_path / "run"
    run.mkdir()
    md = write_report(run, result).read_text()
    assert md.startswith("# World model report")
    assert DASH in md and "How measured" in md
    for link in linked_images(md):
        assert (run / link).is_file()  # only plots that exist are linked
    if not result.get("real") or not isinstance(result.get("real"), dict):
        assert not (run / PLOTS["success"]).exists()


def test_partial_result_links_only_the_plots_it_has(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fake_metrics(run, frame=False)
    (run / PLOTS["open_loop"]).write_bytes(b"stale")  # from an earlier report: removed, not linked
    md = write_report(run, {"run": "r", "real": {"success": 0.5, "episodes": 6, "seeds": [10, 15]}}).read_text()
    links = linked_images(md)
    assert links == [PLOTS["curves"], PLOTS["success"]]
    assert not (run / PLOTS["open_loop"]).exists()
    assert "50.0%" in md and "6 held-out seeds, 10–15" in md
    assert f"| Success, planning in imagination ({DASH}) | {DASH} |" in md


def test_report_from_a_trained_run(world_run, tmp_path):
    """The real metrics.jsonl of a (tiny) trained world run draws its learning curves."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(world_run, run)
    md = write_report(run, {"run": "world", "env_id": "BabyAI-GoToLocal-v0"}).read_text()
    assert PLOTS["curves"] in linked_images(md)
    assert (run / PLOTS["curves"]).stat().st_size > 1000


def test_novelty_and_frame_head_rows_only_when_measured(tmp_path):
    """The unpredictable-frame rows appear when the adapter could replay, the frame-head rows with a frame head."""
    import copy

    res = copy.deepcopy(FULL)
    res["world_model"]["expert"].update(novel=0.266, frame_known=0.84)
    res["world_model"]["perturbed"].update(novel=0.233, frame_known=0.769)
    for k, h in res["open_loop"]["horizons"].items():
        h.update(frame_known=0.5, n_known=7)
    md = write_report(tmp_path / "a", res).read_text()
    assert "| Next observations that reveal a never-seen object (unpredictable): expert / perturbed | 26.6% / 23.3% |" in md
    assert "| Next observation, exact frame on the others (a perfect model: 100%): expert / perturbed | 84.0% / 76.9% |" in md
    assert "50.0% (n=7) / 50.0% (n=7) / 50.0% (n=7)" in md and "frame head" in md
    assert "by the action that led to it" not in md  # not measured: no row
    res["world_model"]["by_action"] = {"2": {"name": "forward", "frame": 0.9, "frame_n": 50, "frame_known": 0.99, "frame_known_n": 40},
                                       "0": {"name": "left", "frame": 0.1, "frame_n": 30, "frame_known": 0.25, "frame_known_n": 8}}
    md = write_report(tmp_path / "c", res).read_text()
    assert ("| Next observation, exact frame by the action that led to it (frames that reveal nothing new) | "
            "left 25.0% (n=8) · forward 99.0% (n=40) |") in md
    plain = copy.deepcopy(FULL)
    del plain["world_model"]["expert"]["frame_parallel"]
    md = write_report(tmp_path / "b", plain).read_text()
    assert "never-seen object (unpredictable)" not in md and "revealed nothing new" not in md
    assert "exact frame in one pass" not in md


def test_seen_cell_rows_and_curves(tmp_path):
    """The restated open-loop rows appear when the seen cells were scored; the plot draws every design's curve."""
    import copy

    from worldloom.world.eval.report import open_loop_curves, plot_open_loop

    res = copy.deepcopy(FULL)
    for (k, h), fs, cs in zip(res["open_loop"]["horizons"].items(), (0.97, 0.81, 0.62), (0.999, 0.991, 0.983)):
        h.update(frame_seen=fs, cell_seen=cs, n_seen=h["n"], cells_seen=40 * h["n"])
    res["open_loop"]["mode"] = "tokens"
    res["open_loop_parallel"] = {"curve": [{"k": k, "frame": 0.5, "frame_seen": 0.6, "cell_seen": 0.9} for k in range(1, 11)]}
    md = write_report(tmp_path / "a", res).read_text()
    assert "| Open loop on the cells seen before (restated): exact frame after 1 / 5 / 10 steps | 97.0% / 81.0% / 62.0% |" in md
    assert "share of those cells right after 1 / 5 / 10 steps | 99.9% / 99.1% / 98.3% |" in md
    assert "earlier REAL observation" in md  # the definition
    assert list(open_loop_curves(res)) == ["tokens", "parallel"]
    assert (tmp_path / "a" / PLOTS["open_loop"]).read_bytes()[:4] == b"\x89PNG"
    md = write_report(tmp_path / "b", FULL).read_text()
    assert "cells seen before (restated)" not in md
    # tiny inputs: one point draws, nothing usable does not
    assert plot_open_loop([{"k": 1, "frame_seen": 1.0}], tmp_path / "one.png") and (tmp_path / "one.png").is_file()
    assert not plot_open_loop({"x": [{"k": 1}], "y": "junk"}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_planning_override_row(tmp_path):
    import copy

    res = copy.deepcopy(FULL)
    res["plan"].update(overrides=0.034, policy_success_same_seeds=0.91)
    md = write_report(tmp_path / "a", res).read_text()
    assert "| Planning: plain policy on the same seeds / share of actions where imagination overrode the policy | 91.0% / 3.4% |" in md
    assert "overrode" not in write_report(tmp_path / "b", FULL).read_text()


def test_rl_success_curve(tmp_path):
    """Drawn from the RL rows of metrics.jsonl (rl_update, or the tuner's update), the last row of a repeated
    update kept; no RL rows: no plot and no link, silently."""
    from worldloom.world.eval.report import plot_rl_success, rl_success_rows

    rows = [{"step": 3, "loss": 1.0}, {"rl_update": 2, "success": 0.5}, {"rl_update": 1, "success": 0.25},
            {"update": 3, "success": 0.75}, {"rl_update": 2, "success": 0.6}, {"rl_update": 4, "success": "x"}]
    assert rl_success_rows(rows) == [(1.0, 0.25), (2.0, 0.6), (3.0, 0.75)]
    assert plot_rl_success(rows[1:2], tmp_path / "one.png", final=0.9)
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_rl_success(rows[:1], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    run = tmp_path / "run"
    run.mkdir()
    fake_metrics(run, rl=True)
    md = write_report(run, FULL).read_text()
    assert PLOTS["rl_success"] in linked_images(md) and (run / PLOTS["rl_success"]).stat().st_size > 1000
    fake_metrics(run)
    md = write_report(run, FULL).read_text()
    assert PLOTS["rl_success"] not in linked_images(md) and not (run / PLOTS["rl_success"]).exists()
