"""The world recipe end to end: collect -> train -> evaluate -> report.

    worldloom train                  # preset babyai: BabyAI-GoToLocal-v0
    worldloom train babyai env.id=BabyAI-PickupLoc-v0 data.episodes=20000

``run_world`` collects bot demonstrations into ``<run>/data`` (unless ``data.path`` names an
existing collection, or the run already has its data), trains the one model that is both
world model and policy, evaluates it (``evaluate_world``) and writes ``eval.json``,
``report.md``, plots and a GIF of imagined beside real frames into the run folder.

With ``stream.spoken`` > 0 an audio tokenizer is trained first into ``<run>/audio-tokenizer``
(unless ``audio.tokenizer`` names one; worldloom.recipes.listen's stage), a share of the training
missions is heard instead of read (worldloom.world.task), and the evaluation plays the same
held-out seeds three times: the mission read, heard in training voices, heard in held-out voices.

With ``data.onpolicy_episodes`` > 0 (DAgger, worldloom.world.data.onpolicy) training pauses at
``data.onpolicy_at`` of its budget, the model plays that many training seeds with the bot
labelling every state, and training resumes on demonstrations + on-policy episodes for the
rest of the same budget and learning-rate schedule.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..io import write_json
from ..runtime import resolve_device, set_threads
from ..train import dist as D
from .eval.report import by_action_text, pct
from ..vision.stage import ensure_tokenizer, has_pixels
from .task import dataset_dir

EVAL_JSON = "eval.json"
HORIZONS = (1, 5, 10)


def collect_for(cfg: RunConfig, out_dir: Path, progress: bool = True, log=print, world: int = 1) -> dict:
    from .data.collect import collect_dataset

    d = cfg.data
    return collect_dataset(out_dir, cfg.env.id, d.episodes, d.val_episodes, seed=d.seed, perturbed_fraction=d.perturbed,
                           epsilon=d.epsilon, workers=d.workers, bot_timeout=d.bot_timeout, progress=progress, log=log,
                           world=world, policy=d.policy, max_steps=d.max_steps)


def eval_seeds(cfg: RunConfig, n: int) -> list[int]:
    """The n held-out seeds a run's policy is evaluated on in the real environment (never collected)."""
    from .data.collect import split_seed

    return [split_seed("eval", cfg.data.seed, i) for i in range(n)]


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_bench_result(out, script: str, argv, **fields) -> Path:
    """A benchmark's JSON record: machine, UTC date, the command line, then ``fields``; written atomically."""
    import datetime
    import sys

    res = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(script).name, *(argv if argv is not None else sys.argv[1:])]), **fields}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, res)
    print(f"wrote {out}")
    return out


def evaluate_world(run, progress: bool = True, log=print, episodes: int | None = None, plan_episodes: int | None = None,
                   precision: str = "fp32") -> dict:
    """Every figure of a world run (see the module docs of metrics, agent, imagine, plan)."""
    from .rollout.agent import run_episodes
    from .envs import make_adapter
    from .data.episodes import load_dataset
    from .rollout.imagine import open_loop_accuracy, open_loop_order
    from .eval.metrics import episode_flags, mission_reading, teacher_forced_accuracy
    from .rollout.plan import ImaginationPlanner

    cfg, model, layout = run.cfg, run.model, run.layout
    ec = cfg.eval
    n_real = episodes if episodes is not None else ec.episodes
    n_plan = plan_episodes if plan_episodes is not None else ec.plan_episodes
    result = {"run": str(run.run_dir), "env_id": cfg.env.id, "step": run.state.get("step"),
              "minutes": round(run.state.get("elapsed", 0.0) / 60, 2), "params": model.num_params(), "machine": machine()}
    t0 = time.perf_counter()

    # held-out transitions (validation seeds): teacher-forced accuracy = greedy one-step imagination
    val = load_dataset(dataset_dir(cfg, run.run_dir)).episodes("val")
    perturbed, after_random = episode_flags(val)
    adapter = make_adapter(cfg.env.id)  # made once: an Atari adapter makes a gym env to read its actions
    novel = adapter.novel_objects(val)  # never-seen objects each next frame reveals (or None)
    read_cells = cell_reader(val)  # pixel worlds with symbolic views stored: predicted frames read back as cells
    own_actions: dict = {}  # the policy's loss on the expert actions behind their own missions, for mission_reading
    wm = teacher_forced_accuracy(model, layout, [layout.episode(e) for e in val], perturbed, after_random,
                                 cfg.model.context, precision=precision, novel=novel, read_cells=read_cells,
                                 views=[e.obs["image"] for e in val] if read_cells else None, action_steps=own_actions)
    result["world_model"] = wm
    log(f"world model (held-out, {len(val)} episodes): next-frame exact {pct(wm, 'expert', 'frame')} expert, "
        f"{pct(wm, 'perturbed', 'frame')} perturbed, {pct(wm, 'after_random', 'frame')} after a random action")
    if "frame_cells" in wm.get("expert", {}):
        log(f"  read back as MiniGrid cells from the decoded frames: {pct(wm, 'expert', 'frame_cells')} expert, "
            f"{pct(wm, 'perturbed', 'frame_cells')} perturbed next frames exact")
    if "novel" in wm.get("expert", {}):
        log(f"  {pct(wm, 'expert', 'novel')} of expert / {pct(wm, 'perturbed', 'novel')} of perturbed next frames reveal an "
            f"object never seen before in the episode (no model can predict those exactly); on the others: "
            f"{pct(wm, 'expert', 'frame_known')} expert, {pct(wm, 'perturbed', 'frame_known')} perturbed")
    names = list(getattr(adapter, "action_names", ()) or ())
    for k, v in wm.get("by_action", {}).items():  # next frames by the action that led to them
        v["name"] = names[int(k)] if int(k) < len(names) else k
    if wm.get("by_action"):
        log("  next frames exact by the action that led to them" + (" (those that reveal nothing new)" if "novel" in wm.get("expert", {}) else "")
            + ": " + by_action_text(wm["by_action"]))

    reading = mission_reading(model, layout, val, cfg.model.context, precision=precision, own=own_actions)
    if reading is not None:  # the policy's loss on the expert's actions behind another episode's mission
        result["mission_reading"] = reading
        o, x = reading["own"], reading["other"]
        log(f"mission read (held-out actions, own -> another episode's mission): step 0 {o['0']['nll']:.3f} -> "
            f"{x['0']['nll']:.3f} nats, all steps {o['all']['nll']:.3f} -> {x['all']['nll']:.3f} "
            f"(accuracy {o['all']['accuracy']:.1%} -> {x['all']['accuracy']:.1%})")

    # open-loop imagination from the real first observation, fed the episode's real actions:
    # token by token (the accurate way); with a frame head, also in one pass per frame
    order = open_loop_order(val, ec.open_loop)
    ol_eps, ol_novel = [val[i] for i in order], [novel[i] for i in order]
    ol_seen = adapter.seen_cells(ol_eps)  # the cells an earlier real observation showed (or None)
    ol_shown = adapter.seen_cells(ol_eps, shown=1)  # the cells whose place o_0, all the model is given, showed
    ol = open_loop_accuracy(model, layout, ol_eps, horizons=HORIZONS, mode="tokens", precision=precision, novel=ol_novel,
                            seen=ol_seen, read_cells=read_cells, shown=ol_shown)
    ol["curve"] = curve_rows(ol["curve"])
    result["open_loop"] = ol
    if model.frame is not None:
        olp = open_loop_accuracy(model, layout, ol_eps, horizons=HORIZONS, mode="parallel", precision=precision,
                                 seen=ol_seen, read_cells=read_cells, shown=ol_shown)
        result["open_loop_parallel"] = {"horizons": olp["horizons"], "curve": curve_rows(olp["curve"])}
    log("open-loop imagination, exact frames: " + ", ".join(
        f"{k} steps {ol['horizons'][str(k)]['frame']:.1%} (n={ol['horizons'][str(k)]['n']})" for k in HORIZONS
        if ol["horizons"].get(str(k), {}).get("n")))
    if any(ol["horizons"].get(str(k), {}).get("n_known") for k in HORIZONS):
        log("  on the episodes that reveal nothing new by then: " + ", ".join(
            f"{k} steps {pct(ol['horizons'], str(k), 'frame_known')} (n={ol['horizons'][str(k)]['n_known']})" for k in HORIZONS
            if ol["horizons"].get(str(k), {}).get("n")))
    if any(ol["horizons"].get(str(k), {}).get("n_seen") for k in HORIZONS):
        log("  on the cells an earlier real observation showed, exact frames / cells right: " + ", ".join(
            f"{k} steps {pct(ol['horizons'], str(k), 'frame_seen')} / {pct(ol['horizons'], str(k), 'cell_seen')}"
            for k in HORIZONS if ol["horizons"].get(str(k), {}).get("n_seen")))
    if any(ol["horizons"].get(str(k), {}).get("n_shown") for k in HORIZONS):
        log("  on the cells the first observation (all the model was shown) showed, exact frames / cells right: " + ", ".join(
            f"{k} steps {pct(ol['horizons'], str(k), 'frame_shown')} / {pct(ol['horizons'], str(k), 'cell_shown')}"
            for k in HORIZONS if ol["horizons"].get(str(k), {}).get("n_shown")))

    # the policy in the real environment, on seeds never used for training or validation
    seeds = eval_seeds(cfg, n_real)
    t = time.perf_counter()
    res = run_episodes(model, layout, cfg.env.id, seeds, envs=ec.envs, greedy=ec.greedy, precision=precision,
                       seed=ec.seed, progress=progress, desc="eval episodes", max_steps=ec.max_steps)
    achievements = adapter.achievements
    result["real"] = _summary(res, seeds, time.perf_counter() - t, achievements)
    result["real"]["policy"] = "greedy" if ec.greedy else "sampled"
    log(f"policy ({result['real']['policy']}) in {cfg.env.id}: success {result['real']['success']:.1%} on {n_real} held-out seeds "
        f"(mean return {result['real']['mean_return']:.3f}, mean length {result['real']['mean_length']:.1f})"
        + (f"; Crafter score {result['real']['crafter_score']:.2f}%" if "crafter_score" in result["real"] else ""))
    if achievements:  # a uniformly random agent on the same seeds: the floor of Crafter's tables
        from .rollout.agent import UniformRandom
        t = time.perf_counter()
        rres = run_episodes(model, layout, cfg.env.id, seeds, envs=ec.envs, planner=UniformRandom(layout.n_actions, ec.seed),
                            precision=precision, progress=progress, desc="random agent", max_steps=ec.max_steps)
        result["random"] = _summary(rres, seeds, time.perf_counter() - t, achievements)
        log(f"uniformly random agent on the same seeds: Crafter score {result['random']['crafter_score']:.2f}% "
            f"(mean return {result['random']['mean_return']:.3f}, mean length {result['random']['mean_length']:.1f})")
    if not ec.greedy:  # the greedy policy too, on the same seeds
        t = time.perf_counter()
        gres = run_episodes(model, layout, cfg.env.id, seeds, envs=ec.envs, greedy=True, precision=precision,
                            progress=progress, desc="eval episodes (greedy)", max_steps=ec.max_steps)
        result["real_greedy"] = _summary(gres, seeds, time.perf_counter() - t, achievements)
        log(f"greedy policy: success {result['real_greedy']['success']:.1%} on the same seeds")
    n_control = min(ec.mission_control, len(seeds))
    if n_control and layout.audio is not None:
        n_control = len(seeds)  # the spoken figures compare on every seed: one control pass serves both
    other = None
    if n_control:  # the same seeds with another level's mission: what reading the mission is worth
        control, other = mission_control(model, layout, cfg, seeds[:n_control], res[:n_control], precision, progress)
        if control is not None:
            result["mission_control"] = control
            log(f"given another level's mission: success {control['other']:.1%} on the first {n_control} seeds "
                f"(own mission {control['own']:.1%}: the mission is worth {control['own'] - control['other']:+.1%})")
    if layout.audio is not None:  # a run that hears missions: the same seeds with the mission spoken
        result["spoken"] = spoken_success(model, layout, cfg, seeds, result["real"]["success"], precision, progress, log,
                                          other=other)

    if n_plan > 0:
        plan_seeds = seeds[:n_plan]
        planner = ImaginationPlanner(horizon=ec.plan_horizon, greedy=ec.greedy, seed=ec.seed)
        t = time.perf_counter()
        pres = run_episodes(model, layout, cfg.env.id, plan_seeds, envs=ec.envs, greedy=ec.greedy, precision=precision,
                            seed=ec.seed, planner=planner, progress=progress, desc="plan episodes")
        result["plan"] = _summary(pres, plan_seeds, time.perf_counter() - t)
        result["plan"]["horizon"] = ec.plan_horizon
        result["plan"]["mode"] = "parallel" if model.frame is not None or model.obs_decoder is not None else "tokens"
        result["plan"]["overrides"] = planner.overrides / max(planner.decisions, 1)  # actions not the policy's own
        same = res[:n_plan]
        result["plan"]["policy_success_same_seeds"] = float(np.mean([r.success for r in same]))
        log(f"planning in imagination (horizon {ec.plan_horizon}): success {result['plan']['success']:.1%} on {n_plan} seeds "
            f"(plain policy on the same seeds {result['plan']['policy_success_same_seeds']:.1%})")
    result.setdefault("timing", {})["eval_s"] = round(time.perf_counter() - t0, 1)
    return result


def mission_control(model, layout, cfg: RunConfig, seeds: list[int], own: list, precision: str = "fp32",
                    progress: bool = True) -> tuple[dict | None, dict | None]:
    """The policy on ``seeds`` given another level's mission (``other_missions``) beside ``own``, its results with
    its own on the same seeds, and the summary of those episodes; (None, None) for an environment whose levels
    all share one mission (nothing to swap)."""
    from .rollout.agent import level_missions, other_missions, run_episodes

    ec = cfg.eval
    levels = level_missions(cfg.env.id, seeds)
    if len(set(levels)) < 2:
        return None, None
    t = time.perf_counter()
    res = run_episodes(model, layout, cfg.env.id, seeds, envs=ec.envs, greedy=ec.greedy, precision=precision, seed=ec.seed,
                       progress=progress, desc="eval episodes, another level's mission", max_steps=ec.max_steps,
                       missions=other_missions(levels))
    seconds = time.perf_counter() - t
    return ({"episodes": len(seeds), "policy": "greedy" if ec.greedy else "sampled",
             "own": float(np.mean([r.success for r in own])), "other": float(np.mean([r.success for r in res])),
             "seconds": round(seconds, 1)}, _summary(res, seeds, seconds))


def spoken_success(model, layout, cfg: RunConfig, seeds: list[int], text_success: float, precision: str = "fp32",
                   progress: bool = True, log=print, other: dict | None = None) -> dict:
    """The policy on ``seeds`` with each mission heard instead of read (worldloom.audio.spoken.voice_for): in a
    training voice drawn from the seed, then in a held-out voice (never heard by the tokenizer nor the model);
    beside ``text_success``, the same policy on the same seeds reading the mission. The control
    ``other_mission``: the same seeds given another level's mission as text (how much the mission is worth: a
    policy that ignores it scores the same there as with its own); ``other``, the summary of that pass where
    the caller played it already (``mission_control`` on the same seeds)."""
    from ..audio.spoken import voice_for
    from .rollout.agent import level_missions, other_missions, run_episodes

    ec = cfg.eval
    held = layout.audio.cfg.held_out()
    out = {"policy": "greedy" if ec.greedy else "sampled", "text": text_success, "held_out": ",".join(sorted(held))}
    for key, is_held, what in (("training_voices", False, "training voices"), ("held_out_voices", True, "held-out voices")):
        t = time.perf_counter()
        voices = [voice_for(s, held, is_held) for s in seeds]
        res = run_episodes(model, layout, cfg.env.id, seeds, envs=ec.envs, greedy=ec.greedy, precision=precision, seed=ec.seed,
                           progress=progress, desc=f"eval episodes, heard ({what})", max_steps=ec.max_steps, voices=voices)
        out[key] = _summary(res, seeds, time.perf_counter() - t)
    if other is None:
        t = time.perf_counter()
        res = run_episodes(model, layout, cfg.env.id, seeds, envs=ec.envs, greedy=ec.greedy, precision=precision,
                           seed=ec.seed, progress=progress, desc="eval episodes, another level's mission",
                           max_steps=ec.max_steps, missions=other_missions(level_missions(cfg.env.id, seeds)))
        other = _summary(res, seeds, time.perf_counter() - t)
    out["other_mission"] = other
    out["gap"] = text_success - out["training_voices"]["success"]
    log(f"spoken missions ({out['policy']} policy, same {len(seeds)} seeds): success {out['training_voices']['success']:.1%} "
        f"in training voices, {out['held_out_voices']['success']:.1%} in held-out voices ({out['held_out']}); "
        f"{text_success:.1%} with the text mission, {out['other_mission']['success']:.1%} given another level's mission")
    return out


def cell_reader(episodes: list):
    """For episodes of a pixel world that stores its symbolic views too (``rgb:`` MiniGrid): a function from
    frames to the views they show (``CellReader`` prototypes from these episodes' real frames: how the
    renderer draws each cell, not what the model imagines); None for other worlds."""
    from .envs.pixels import PIXELS

    if not episodes or not {"image", PIXELS} <= set(episodes[0].obs):
        return None
    from ..vision.cells import CellReader

    frames = {k: np.concatenate([e.obs[k] for e in episodes]) for k in ("image", PIXELS)}
    return CellReader(frames).views


def curve_rows(curve: dict) -> list[dict]:
    """{"k": [...], "frame": [...], ...} -> [{"k": 1, "frame": ..., ...}, ...] (one row per horizon)."""
    keys = list(curve)
    return [dict(zip(keys, vals)) for vals in zip(*(curve[k] for k in keys))]


def _summary(results, seeds, seconds: float, achievements: tuple[str, ...] = ()) -> dict:
    """Success (a positive return), mean return and length; with ``achievements`` (the environment's list,
    e.g. Crafter's 22) the success rate of each and the Crafter score."""
    out = {"episodes": len(results), "success": float(np.mean([r.success for r in results])),
           "mean_return": float(np.mean([r.ret for r in results])), "mean_length": float(np.mean([r.length for r in results])),
           "seeds": [int(seeds[0]), int(seeds[-1])], "seconds": round(seconds, 1)}
    if achievements:
        rates = {a: float(np.mean([a in r.achievements for r in results])) for a in achievements}
        out["achievements"] = rates
        out["crafter_score"] = crafter_score(list(rates.values()))
    return out


def crafter_score(rates: list[float]) -> float:
    """Crafter's score (Hafner 2021): the geometric mean of the achievements' success rates in percent,
    S = exp(mean(ln(1 + s_i))) - 1, so that rare achievements count."""
    s = np.asarray(rates, np.float64) * 100
    return float(np.exp(np.mean(np.log1p(s))) - 1)


def write_outputs(run, result: dict, log=print, gif_seed: int | None = None, gif_steps: int = 20) -> Path:
    """eval.json, the GIF of imagined beside real frames, and report.md in the run folder."""
    from .rollout.imagine import imagined_vs_real, write_rollout_gif
    from .eval.report import write_report

    run_dir = Path(run.run_dir)
    write_json(run_dir / EVAL_JSON, result)
    seed = gif_seed if gif_seed is not None else eval_seeds(run.cfg, 1)[0]
    frames = imagined_vs_real(run, run.cfg.env.id, seed, gif_steps)
    gif = run_dir / "imagined.gif"
    write_rollout_gif(frames, gif)
    return write_report(run_dir, result, gif)


def run_world(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    """collect (if needed) -> train -> evaluate -> report; returns the evaluation result.

    Under torchrun (``train.dist``) the ranks share the collection (each plays its own seeds, rank 0
    writes the folder: the data of one process), every rank trains, and rank 0 evaluates and writes
    the report (the others return an empty result)."""
    set_threads(cfg.train.threads)
    dist = D.init(cfg.train.dist, resolve_device(cfg.train.device))
    timing = {}
    data = dataset_dir(cfg, cfg.run_dir)
    t = time.perf_counter()
    need = dist.main and not (data / "meta.json").is_file()
    if need and cfg.data.path:
        from .data.episodes import load_dataset

        load_dataset(data)  # the user named a folder: report what is wrong with it
    if D.agree("collect" if need else "have", ("have", "collect"), dist) == "collect":
        collect_for(cfg, data, progress and dist.main, log if dist.main else (lambda *a: None), world=dist.world)
    D.barrier(dist)
    timing["collect_s"] = round(time.perf_counter() - t, 1)
    if cfg.stream.spoken:  # missions heard through an audio tokenizer: trained first unless named
        from ..recipes.listen import ensure_tokenizer as ensure_audio_tokenizer
        from .task import AUDIO_DIR

        t = time.perf_counter()
        if dist.main:
            ensure_audio_tokenizer(cfg, Path(cfg.run_dir), progress, log, folder=AUDIO_DIR)
        D.barrier(dist)
        timing["audio_tokenizer_s"] = round(time.perf_counter() - t, 1)
    if has_pixels(cfg.env.id):  # frames become tokens through an image tokenizer: trained first unless named
        t = time.perf_counter()
        if dist.main:
            ensure_tokenizer(cfg, Path(cfg.run_dir), progress, log)
        D.barrier(dist)
        timing["tokenizer_s"] = round(time.perf_counter() - t, 1)
    return _train_and_report(cfg, Path(cfg.run_dir), [], False, timing, progress, log)


def resume_world(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    """Finish an interrupted world run: train from its last checkpoint (collecting on-policy
    episodes first if the run asks for them and has reached that point), then evaluate and report."""
    from ..train.loop import resume_config

    cfg = resume_config(Path(run_dir), list(overrides))
    return _train_and_report(cfg, Path(run_dir), list(overrides), True, {}, progress, log)


def _train_and_report(cfg: RunConfig, run_dir: Path, overrides: list[str], resuming: bool, timing: dict,
                      progress: bool, log) -> dict:
    """Train (pausing for on-policy collection if asked), evaluate, write the report."""
    from ..run import load_world_run
    from ..train import train
    from .data.episodes import META_FILE, load_dataset
    from .data.onpolicy import ONPOLICY_DIR, collect_onpolicy

    def train_until(stop_at: float) -> dict:
        if resuming:
            return train(resume=run_dir, overrides=overrides, progress=progress, log=log, stop_at=stop_at)
        return train(cfg, progress=progress, log=log, stop_at=stop_at)

    t = time.perf_counter()
    d = cfg.data
    onpolicy = run_dir / ONPOLICY_DIR
    dist = D.init(cfg.train.dist, resolve_device(cfg.train.device))
    if d.onpolicy_episodes and not (onpolicy / META_FILE).is_file():
        train_until(d.onpolicy_at)
        resuming = True
        t1 = time.perf_counter()
        if dist.main:
            collect_onpolicy(load_world_run(run_dir), onpolicy, d.onpolicy_episodes, envs=cfg.eval.envs,
                             bot_timeout=d.bot_timeout, seed=cfg.train.seed, progress=progress, log=log)
        D.barrier(dist)
        timing["onpolicy_s"] = round(time.perf_counter() - t1, 1)
    summary = train_until(1.0)
    timing["train_s"] = round(time.perf_counter() - t - timing.get("onpolicy_s", 0.0), 1)
    if not dist.main:
        return {}
    run = load_world_run(run_dir)
    result = evaluate_world(run, progress=progress, log=log)
    result["timing"] = {**timing, **result.get("timing", {})}
    result["train"] = {k: summary[k] for k in ("step", "val_loss", "minutes", "params", "precision")}
    if (onpolicy / META_FILE).is_file():
        result["onpolicy"] = {k: v for k, v in load_dataset(onpolicy).meta["splits"]["train"].items()
                              if k in ("episodes", "steps", "successes", "labelled_steps", "agreement", "seconds")}
    report = write_outputs(run, result, log)
    log(f"report: {report}")
    return result


def read_eval(run_dir: Path) -> dict | None:
    p = Path(run_dir) / EVAL_JSON
    return json.loads(p.read_text()) if p.is_file() else None
