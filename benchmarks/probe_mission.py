"""Does a policy read its mission? Teacher-forced action loss on held-out episodes, by step, with each
episode's own mission and with another episode's.

A world run's policy (and, with ``--baseline-minutes``, the BabyAI-1.1-style learner of
``benchmarks/babyai11.py`` trained on the same episodes) predicts the bot's action at every step of the
validation episodes twice: once behind the episode's own mission, once behind the mission of the episode
seven places on (another target; the few that happen to share it are counted). A policy that reads its
mission loses much more on the wrong one, above all at the first steps, before the path shows the target.
Unlike success with another level's mission (``eval.mission_control``), this is not blurred by an
episode that goes on until the agent happens to face the right object.

    python benchmarks/probe_mission.py runs/babyai                            # the run's own validation split
    python benchmarks/probe_mission.py runs/babyai --baseline-minutes 10.5     # + the baseline, same data
    python benchmarks/probe_mission.py runs/enc --data runs/babyai/data --out probe.json

Prints a table (NLL in nats per action, accuracy of the argmax) and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worldloom.world.eval.metrics import MISSION_STEPS as STEPS, by_step  # noqa: E402 - as the pipeline
from worldloom.world.eval.metrics import rotated_missions as rotated  # noqa: E402


def probe_run(run_dir: Path, episodes: list) -> dict:
    """Per-step action NLL / accuracy of a world run's policy, own and other missions (the pipeline's
    ``mission_reading``, which every world evaluation reports too)."""
    from worldloom.run import load_world_run
    from worldloom.world.eval.metrics import mission_reading

    run = load_world_run(run_dir)
    res = mission_reading(run.model, run.layout, episodes, run.model.cfg.context)
    if res is None:
        raise SystemExit("probe_mission: every episode has the same mission; nothing to swap")
    return {"own": res["own"], "other": res["other"]}


@torch.no_grad()
def probe_baseline(data_dir: Path, episodes: list, minutes: float, log=print) -> dict:
    """Train the BabyAI-1.1-style learner on the data's train split for ``minutes``; the same probe."""
    import babyai11 as b11
    from worldloom.world.data.episodes import load_dataset

    ds = load_dataset(data_dir)
    train = b11.Demos.from_episodes(ds.episodes("train"))
    vocab = b11.Vocab(train.missions)
    torch.manual_seed(0)
    model = b11.BabyAI11(int(ds.meta["n_actions"]), len(vocab), 128)
    with torch.enable_grad():
        fit = b11.train_bc(model, train, vocab, minutes, log=log)
    model.eval()
    val = b11.Demos.from_episodes(episodes)
    res = {"fit": fit, "params": model.num_params()}
    for name, missions in (("own", val.missions), ("other", rotated(val.missions))):
        d = b11.Demos(val.images, val.labels, val.offsets, missions)
        by: dict[int, list] = {}
        for i in range(0, len(d), 64):
            bt = d.batch(range(i, min(i + 64, len(d))), vocab)
            logp = torch.log_softmax(model(bt["images"], model.encode_mission(bt["ids"], bt["lengths"]), None,
                                           bt["valid"])[0], -1)
            for r, t in torch.nonzero(bt["labels"] >= 0).tolist():
                y = int(bt["labels"][r, t])
                by.setdefault(min(t, STEPS), []).append((-float(logp[r, t, y]), int(logp[r, t].argmax() == y)))
        res[name] = by_step(by)
    return res


def table(results: dict) -> str:
    rows = ["| policy | step | NLL own | NLL other | other - own | accuracy own | accuracy other | actions |",
            "|---|---|---|---|---|---|---|---|"]
    for who, r in results.items():
        for k in r["own"]:
            o, x = r["own"][k], r["other"][k]
            rows.append(f"| {who} | {k} | {o['nll']:.3f} | {x['nll']:.3f} | {x['nll'] - o['nll']:+.3f} | "
                        f"{o['accuracy']:.1%} | {x['accuracy']:.1%} | {o['n']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a world run folder (its policy is probed)")
    ap.add_argument("--data", type=Path, help="episode folder whose validation split is used (default: RUN/data)")
    ap.add_argument("--episodes", type=int, default=300, help="validation episodes to probe (default 300)")
    ap.add_argument("--baseline-minutes", type=float, default=0.0,
                    help="also train the BabyAI-1.1-style learner this long on the data's train split and probe it")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "probe_mission.json")
    a = ap.parse_args(argv)
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.pipeline import write_bench_result

    if a.threads:
        torch.set_num_threads(a.threads)
    data = a.data or a.run / "data"
    if not (a.run / "checkpoint.json").is_file():
        ap.error(f"{a.run} holds no trained run (no checkpoint.json)")
    if not data.is_dir():
        ap.error(f"no episode folder at {data}; pass --data")
    episodes = [e for e in load_dataset(data).episodes("val") if e.length > 0][: a.episodes]
    same = sum(m == o for m, o in zip([e.mission for e in episodes], rotated([e.mission for e in episodes])))
    results = {a.run.name: probe_run(a.run, episodes)}
    if a.baseline_minutes > 0:
        results["BabyAI-1.1-style baseline"] = probe_baseline(data, episodes, a.baseline_minutes)
    print(f"{len(episodes)} validation episodes of {data} ({same} keep their own mission after the rotation)")
    print(table(results))
    write_bench_result(a.out, __file__, argv, run=str(a.run), data=str(data), episodes=len(episodes),
                       same_mission_after_rotation=same, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
