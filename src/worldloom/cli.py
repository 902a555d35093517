"""The `worldloom` command: presets, train, collect, generate, fill, eval, imagine, tune, export, lora, import, data, serve, quantize, agent.

Errors a user can fix print one line (``worldloom: error: ...``) and exit with status 2;
nothing a user does should end in a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .errors import WorldloomError

EPILOG_TRAIN = """\
examples:
  worldloom train                                   # preset babyai: collect, train, evaluate, report (~15 min)
  worldloom train babyai env.id=BabyAI-PickupLoc-v0 data.episodes=20000
  worldloom train babyai data.path=data/goto        # train on episodes from `worldloom collect`
  worldloom train shakespeare-char data.path=input.txt
  worldloom train text-bpe data.path=corpus.txt tokenizer.vocab_size=4096 model.n_layer=4
  worldloom train shakespeare-char data.path=input.txt train.max_minutes=5 name=quick
  worldloom train --resume runs/shakespeare-char            # continue after a kill
  worldloom train --resume runs/quick train.max_steps=8000  # extend a finished run
  worldloom train shakespeare-char data.path=input.txt train.objective=combined name=both  # next + masked

Any config field can be set as group.key=value (groups: data, env, stream, tokenizer,
model, train, eval; top-level: name, out_dir, recipe). `worldloom presets --show NAME` prints a preset's fields.
"""


EPILOG_TUNE = """\
examples (docs/tuning.md has the whole path, data formats included):
  worldloom tune sft  runs/base data.path=data/instr/train.jsonl lora.rank=8 name=sft
  worldloom tune prefs runs/sft data.path=data/instr/prompts.jsonl --samples 4 --out data/prefs
  worldloom tune dpo  runs/sft data.path=data/prefs/train.jsonl dpo.beta=0.1 name=dpo   # dpo.loss=ipo: IPO
  worldloom tune orpo runs/base data.path=data/prefs/train.jsonl name=orpo
  worldloom tune reward runs/sft data.path=data/prefs/train.jsonl name=rm
  worldloom tune ppo  runs/sft data.path=data/instr/prompts.jsonl reward=checker name=ppo
  worldloom tune ppo  runs/babyai rl.updates=50 rl.envs=32 name=ppo       # a world run: PPO in BabyAI
  worldloom tune ppo  runs/babyai rl.world=imagined name=ppo-imagined      # a world run: PPO inside its world model
  worldloom tune dpo  runs/babyai wdpo.seeds=256 name=babyai-dpo          # a world run: trajectory DPO
  worldloom tune dpo --resume runs/dpo                                      # continue after a kill
  worldloom tune medusa runs/big heads=4 name=big-medusa                    # Medusa heads (generate --medusa)
  worldloom tune draft runs/big name=big-draft                              # a draft model distilled from runs/big (--draft)

Keys: lora.* (rank: 0 = every weight trains; alpha, dropout, targets), dpo.* (beta, loss), orpo.lam,
tune.* (prompt_format, stop, val_fraction, eval_rows), train.* (max_steps, lr, batch_size, ...),
rl.* (ppo: updates, batch, kl_reward, lr, eval_path, world=real|imagined, ...), wdpo.* (trajectory DPO:
seeds, samples, beta, lr, epochs, eval_episodes), medusa.* (heads, samples, prompt, length, temperature),
draft.* (samples, prompt, length, temperature, init) and model.* (the draft's size), name, out_dir.
"""


def _cmd_presets(args) -> int:
    import yaml

    from .config import load_preset, preset_description, preset_names

    if args.show:
        print(yaml.safe_dump(load_preset(args.show), sort_keys=False), end="")
        return 0
    for name in preset_names():
        print(f"{name:20s} {preset_description(name)}")
    return 0


def _preset(args) -> str | None:
    """The preset word of `train` / `collect`, or None when the first word is an override (`key=value`)."""
    if args.preset and "=" in args.preset:
        args.overrides.insert(0, args.preset)
        args.preset = None
    return args.preset


def _cmd_train(args) -> int:
    from .config import build_config
    from .recipes import get_recipe

    preset = _preset(args)
    progress = not args.no_progress
    if args.resume:
        if preset:
            raise WorldloomError("give either a preset or --resume RUN, not both")
        from .run import read_run_config

        get_recipe(read_run_config(Path(args.resume)).recipe).resume(Path(args.resume), args.overrides, progress=progress)
        return 0
    cfg = build_config(preset or "babyai", args.overrides)
    get_recipe(cfg.recipe).run(cfg, progress=progress)
    return 0


def _cmd_collect(args) -> int:
    from .config import build_config
    from .world.pipeline import collect_for

    preset = _preset(args)
    cfg = build_config(preset or "babyai", args.overrides)
    out = Path(args.out) if args.out else Path("data") / cfg.env.id
    collect_for(cfg, out, progress=not args.no_progress)
    print(f"train on it with: worldloom train {preset or 'babyai'} env.id={cfg.env.id} data.path={out}")
    return 0


def _cmd_imagine(args) -> int:
    from .run import load_world_run
    from .runtime import set_threads
    from .world.rollout.imagine import ImagineStats, imagined_vs_real, write_rollout_gif

    if args.steps < 1:
        raise WorldloomError(f"--steps must be at least 1, got {args.steps}")
    set_threads(0)
    run = load_world_run(Path(args.run))
    if args.fast and run.model.frame is None and run.model.obs_decoder is None:
        raise WorldloomError(f"--fast drafts with the frame head, which {args.run} lacks (train with "
                             "stream.parallel_obs=true); drop --fast")
    stats = ImagineStats()
    frames = imagined_vs_real(run, run.cfg.env.id, args.seed, args.steps, mode="fast" if args.fast else "tokens", stats=stats)
    write_rollout_gif(frames, Path(args.out))
    exact = sum(1 for f in frames[1:] if f[3]) if frames and len(frames[0]) > 3 else None
    print(f"wrote {args.out}: {len(frames)} frames of {run.cfg.env.id} seed {args.seed}, real (left) beside imagined (right)"
          + (f"; {exact}/{len(frames) - 1} imagined frames exactly right" if exact is not None else ""))
    if args.fast and run.model.obs_decoder is not None:
        print("--fast: this model encodes observations; its frame decoder predicts whole frames in every mode")
    elif args.fast:
        print(f"fast imagination: {stats.forwards_per_step:.1f} forwards per imagined step "
              f"(token by token: {run.layout.step_len}), {stats.acceptance:.1%} of frame-head drafts accepted")
    return 0


def _cmd_tune(args) -> int:
    """`tune sft|dpo|orpo|reward|medusa|draft RUN` (text runs, through the training loop), `tune prefs RUN`
    (sample preference pairs), `tune ppo RUN` (a world run: PPO in its environment; a text run: RLHF)."""
    if args.run and "=" in args.run:  # `tune ppo --resume RL_RUN rl.updates=100`: an override, not a run
        args.overrides.insert(0, args.run)
        args.run = None
    if bool(args.run) == bool(args.resume):
        raise WorldloomError(f"give a run to tune (worldloom tune {args.method} RUN) or --resume TUNED_RUN, not both or neither")
    run = Path(args.run) if args.run else None
    resume = Path(args.resume) if args.resume else None
    if args.method == "prefs":
        from .tune.prefs import sample_prefs

        if resume:
            raise WorldloomError("tune prefs has nothing to resume; run it again (it overwrites --out only when finished)")
        sample_prefs(run, args.overrides, samples=args.samples, out=args.out, progress=not args.no_progress)
    elif args.method == "dpo" and _is_world(run or resume):
        from .world.dpo import tune_world_dpo

        if resume:
            raise WorldloomError("trajectory DPO of a world run is not resumable yet; run it again (it takes minutes)")
        tune_world_dpo(run, args.overrides, progress=not args.no_progress)
    elif args.method == "ppo" and _is_world(run or resume):
        from .world.rl import tune

        tune(run, args.overrides, resume=resume, progress=not args.no_progress)
    elif args.method == "ppo":
        from .tune.ppo import tune_text

        tune_text(run, args.overrides, resume=resume, progress=not args.no_progress)
    else:
        from .tune.common import tune_recipe

        tune_recipe(args.method, run, args.overrides, resume=resume, progress=not args.no_progress)
    return 0


def _is_world(run_dir: Path) -> bool:
    """Whether a run folder (or a world PPO run, whose config is its source's) holds a world run."""
    from .recipes import get_recipe
    from .run import read_run_config

    return get_recipe(read_run_config(run_dir).recipe).world


def _cmd_quantize(args) -> int:
    """`quantize RUN --bits 8` (weight-only int8, written at once) or `--bits 1.58` (ternary QAT, then packed)."""
    from .quant import parse_bits, quantize

    out = quantize(Path(args.run), parse_bits(args.bits), args.overrides, progress=not args.no_progress)
    print(f"quantised run: {out}; try: worldloom generate {out} \"Hello\"   or   worldloom eval {out}")
    return 0


def _cmd_data(args) -> int:
    from .tune.tasks import FAMILIES, make_instruct

    if args.kind == "icl":
        from .tune.icl_tasks import make_icl

        meta = make_icl(Path(args.out), n=args.n, per_kind=args.families, rows=args.rows, seed=args.seed)
        print(f"wrote {args.out}: train.txt {meta['episodes']:,} episodes of {len(meta['train_kinds'])} kinds, test.jsonl "
              f"{meta['families']['test']} held-out families ({meta['rows']['test']:,} rows), seen.jsonl "
              f"{meta['families']['seen']} families; next: worldloom train icl name=icl, then "
              f"worldloom eval runs/icl --icl {Path(args.out) / 'test.jsonl'}")
        return 0

    tasks = args.tasks.split(",") if args.tasks is not None else list(FAMILIES)
    meta = make_instruct(tasks, args.n, Path(args.out), seed=args.seed, test_n=args.test_n, progress=not args.no_progress)
    per_task = ", ".join(f"{t} {c:,}" for t, c in meta["counts"]["train"].items())
    print(f"wrote {args.out}: train.jsonl {meta['rows']['train']:,} rows ({per_task}), test.jsonl {meta['rows']['test']:,}, "
          f"prompts.jsonl {meta['rows']['prompts']:,}, pretrain.txt; next: worldloom train text-bpe "
          f"data.path={Path(args.out) / 'pretrain.txt'} name=base")
    return 0


def _cmd_data_react(args) -> int:
    from .agent.traces import make_react

    meta = make_react(args.n, Path(args.out), seed=args.seed, test_n=args.test_n)
    print(f"wrote {args.out}: train.jsonl {meta['rows']['train']:,} rows (each question with and without tools), "
          f"train_tools.jsonl, train_direct.jsonl, test.jsonl {meta['rows']['test']:,} questions, pretrain.txt; next: "
          f"worldloom tune sft RUN data.path={Path(args.out) / 'train.jsonl'} 'tune.stop=\"\\n\\n\"' name=react")
    return 0


def _cmd_agent(args) -> int:
    from .agent import Agent, make_tools
    from .runtime import set_threads

    if not args.question.strip():
        raise WorldloomError("the question is empty; ask something")
    set_threads(0)
    from .run import load_run

    run = load_run(Path(args.run))  # before the tools: a missing run is the first thing to say
    tools = make_tools(args.tools) if args.tools else []

    def show(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    agent = Agent(run, tools, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, seed=args.seed or 0, on_text=None if args.json else show)
    if not args.json:
        print(agent.prompt(args.question), end="", flush=True)
    result = agent.run(args.question)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"\n[stopped: {result.stopped_because}{'; ' + result.problem if result.problem else ''}]")
    return 0


def _sampling(args):
    from .decode import SamplingConfig

    try:
        return SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise WorldloomError(str(e)) from None


def _cmd_generate(args) -> int:
    import torch

    from .decode import stream_batch
    from .run import load_run
    from .runtime import autocast, resolve_precision, set_threads

    if args.view or args.draw is not None:  # a talk run: text about a view, or a view from text
        from .talk.commands import generate

        return generate(args)
    if not args.prompt:
        raise WorldloomError("the prompt is empty; give some text to continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise WorldloomError("the prompt is not valid Unicode (it holds bytes that are not UTF-8)") from None
    if args.num_samples < 1:
        raise WorldloomError(f"--num-samples must be at least 1, got {args.num_samples}")
    set_threads(0)
    run = load_run(Path(args.run))
    if run.is_world:
        raise WorldloomError(f"{args.run} is a world model; use `worldloom imagine {args.run}` or `worldloom eval {args.run}`")
    if run.cfg.train.objective == "masked":
        raise WorldloomError(f"{args.run} was trained with train.objective=masked (fill-mask only); use `worldloom fill {args.run} TEXT`")
    if args.compile and not run.model.supports_decode_step:
        mc = run.cfg.model
        raise WorldloomError(f"--compile needs an attention-only model without MoE; this run has model.backbone={mc.backbone}"
                             f"{f' (layers {mc.layers})' if mc.layers else ''}, model.ffn={mc.ffn}; drop --compile")
    sc = _sampling(args)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    ctx = (lambda: autocast(precision, torch.device("cpu"))) if precision != "fp32" else None
    prompts = [args.prompt] * args.num_samples
    speculative = _speculative_args(args, run)
    t0 = time.perf_counter()
    stream = stream_batch(run.model, run.tokenizer, prompts, sc, args.stop, ctx, args.compile, **speculative)
    try:
        if args.num_samples == 1:
            sys.stdout.write(args.prompt)
            for _, text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            outs = [""] * len(prompts)
            for i, text in stream:
                outs[i] += text
            for i, text in enumerate(outs):
                print(f"--- sample {i + 1}\n{args.prompt}{text}")
    except ValueError as e:  # a sampling setting decode refuses (it validates as it samples)
        raise WorldloomError(f"cannot sample: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _print_decode_stats(speculative.get("stats"), time.perf_counter() - t0, args.quiet)
    return 0


def _speculative_args(args, run) -> dict:
    """generate's --draft / --lookup / --medusa as decode.generate_ids arguments (a SpecStats always counts)."""
    from .inference.speculative import LookupDrafter, ModelDrafter, SpecStats

    if sum(map(bool, (args.draft, args.lookup, args.medusa))) > 1:
        raise WorldloomError("--draft, --lookup and --medusa are three ways to draft; choose one")
    if (args.draft or args.lookup or args.medusa) and args.compile:
        raise WorldloomError("speculative decoding (--draft/--lookup/--medusa) runs uncompiled; drop --compile")
    out = {"stats": SpecStats(), "draft_tokens": args.draft_tokens}
    if args.medusa:
        from .adapters.medusa import heads_of

        heads_of(run.model)  # a run without heads: one line
        out["medusa"] = True
    elif args.lookup:
        out["drafter"] = LookupDrafter()
    elif args.draft:
        from .run import load_run

        draft = load_run(Path(args.draft))
        if draft.is_world:
            raise WorldloomError(f"--draft {args.draft} is a world model; a draft is a text run with {args.run}'s tokenizer")
        if draft.tokenizer.tok.to_str() != run.tokenizer.tok.to_str():
            raise WorldloomError(f"--draft {args.draft} has another tokenizer than {args.run}; a draft must share the "
                                 f"target's tokenizer (train it on the same data with the same tokenizer.* settings)")
        out["drafter"] = ModelDrafter(draft.model)
    return out


def _print_decode_stats(stats, seconds: float, quiet: bool) -> None:
    """The closing line of generate (stderr): tokens/s and, when speculative, acceptance."""
    if quiet or stats is None or not stats.tokens and not stats.forwards:
        return
    line = f"[{stats.tokens} tokens in {seconds:.2f} s: {stats.tokens / max(seconds, 1e-9):.1f} tokens/s"
    if stats.verifications:
        line += (f"; {stats.verifications} verifications, mean accepted length {stats.mean_accepted:.2f}, "
                 f"drafts accepted {100 * stats.acceptance:.0f}%, {stats.tokens_per_forward:.2f} tokens per target pass")
    print(line + "]", file=sys.stderr)


def _cmd_fill(args) -> int:
    from .fill import check_fill_run, fill_masks
    from .run import load_run
    from .runtime import set_threads

    set_threads(0)
    run = load_run(Path(args.run))
    check_fill_run(run, args.run)
    print(fill_masks(run.model, run.tokenizer, args.text, parallel=args.parallel))
    return 0


def _cmd_eval(args) -> int:
    from .recipes import get_recipe
    from .run import load_run
    from .runtime import set_threads

    if args.batch_size < 1:
        raise WorldloomError(f"--batch-size must be at least 1, got {args.batch_size}")
    set_threads(0)
    run = load_run(Path(args.run), any_model=True)
    if args.icl:
        if run.is_world or run.tokenizer is None or args.tasks or args.baseline:
            raise WorldloomError("--icl FILE scores a text run's in-context learning, on its own (not with --tasks/--baseline)")
        from .tune.icl import evaluate_icl

        return evaluate_icl(args, run)
    if args.tasks or args.baseline:
        if run.is_world or run.tokenizer is None or not args.tasks:
            raise WorldloomError("--tasks FILE scores a text run's answers (--baseline RUN goes with it)")
        from .tune.evaluate import evaluate_tasks

        return evaluate_tasks(args, run)
    return get_recipe(run.cfg.recipe).evaluate(args, run)


def _cmd_export(args) -> int:
    from .export.hf import ADAPTER_DIR, export_hf
    from .run import load_run

    run = load_run(Path(args.run))
    if run.is_world:
        raise WorldloomError(f"{args.run} is a world model (slot embeddings, stream layout); `export hf` takes text models only")
    out = export_hf(run, Path(args.out), merged=args.merged)
    print(f"wrote {out} (load with transformers.LlamaForCausalLM.from_pretrained('{out}'))")
    if (out / ADAPTER_DIR).is_dir():
        print(f"its LoRA adapter: peft.PeftModel.from_pretrained(model, '{out / ADAPTER_DIR}')")
    return 0


def _cmd_lora(args) -> int:
    from .adapters.folder import merge_run

    out = merge_run(Path(args.run), Path(args.out))
    print(f"wrote {out}: a plain run with the adapters of {args.run} merged into its weights")
    return 0


def _cmd_serve(args) -> int:
    from .runtime import set_threads
    from .serve import check_installed, serve

    check_installed()
    set_threads(args.threads)
    serve(args.runs, args.host, args.port, args.api_key, args.max_batch, args.max_queue, args.max_sessions,
          args.session_ttl)
    return 0


def _cmd_import(args) -> int:
    from .export.import_hf import import_hf

    out = import_hf(Path(args.path), args.overrides)
    print(f"wrote {out}; try: worldloom generate {out} \"Hello\"   (eval needs --data FILE)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (no usage block before them), from any sub-command:
    ``worldloom: error: ... (see `worldloom generate --help`)``."""

    def error(self, message):
        self.exit(2, f"worldloom: error: {message} (see `{self.prog} --help`)\n")


INT64 = 2**63 - 1


def _int_in(lo: int, hi: int = INT64):
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:,} and {hi:,}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False, zero: bool = False):
    """An argparse type: a finite number in [lo, hi] ((lo, hi] with lo_open); 0 also allowed with zero."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if zero and value == 0:
            return 0.0
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"must be {'0 or ' if zero else ''}a finite number in {span}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _out_path(text: str) -> str:
    """An argparse type: a path to write (not empty, no NUL)."""
    if not text.strip() or "\x00" in text:
        raise argparse.ArgumentTypeError(f"expected a path to write, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="worldloom", description="Train, sample, evaluate and export large world models on a CPU.")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    s = sub.add_parser("presets", help="list the shipped presets")
    s.add_argument("--show", metavar="NAME", help="print every field a preset sets")
    s.set_defaults(fn=_cmd_presets)

    s = sub.add_parser("train", help="train a model from a preset (or resume a run)", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("preset", nargs="?", help="preset name (see `worldloom presets`); default babyai")
    s.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    s.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    s.add_argument("--no-progress", action="store_true", help="print a line per evaluation instead of a progress bar")
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("collect", help="collect bot demonstrations of a BabyAI/MiniGrid level into episode shards",
                       epilog="examples:\n  worldloom collect babyai env.id=BabyAI-GoTo-v0 data.episodes=5000 --out data/goto\n"
                              "  worldloom collect data.episodes=1000 data.perturbed=0 --out data/expert-only\n\n"
                              "Training seeds are data.seed+i, validation data.seed+1000000+i; data.seed+2000000+i are kept for evaluation.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("preset", nargs="?", help="preset name; default babyai")
    s.add_argument("overrides", nargs="*", help="config overrides (env.id, data.episodes, data.val_episodes, data.perturbed, data.epsilon, data.workers, ...)")
    s.add_argument("--out", type=_out_path, help="output folder (default data/<env id>)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=_cmd_collect)

    def sampling_args(s):
        s.add_argument("--max-new-tokens", type=_int_in(0, 10**7), default=200)
        s.add_argument("--temperature", type=_float_in(1e-3, 1e6, zero=True), default=0.8, help="0 = greedy")
        s.add_argument("--top-k", type=_int_in(0), default=0, help="keep the k likeliest tokens (0 = off)")
        s.add_argument("--top-p", type=_float_in(1e-6, 1.0), default=1.0, help="nucleus sampling mass (1 = off)")
        s.add_argument("--seed", type=_int_in(0), default=None, help="sampling seed, for repeatable samples")
        s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])

    s = sub.add_parser("generate", help="continue a prompt with a trained model (streams to stdout)")
    s.add_argument("run", help="run folder, e.g. runs/shakespeare-char")
    s.add_argument("prompt", nargs="?", default="", help="text to continue")
    sampling_args(s)
    s.add_argument("--view", metavar="seed=N", help="talk runs: the first view of level N in context, then the prompt "
                   "continued (\"Q: what is in front of you? A:\", \"caption:\")")
    s.add_argument("--draw", metavar="TEXT", help="talk runs: draw a view from a description (\"a red ball two steps ahead\")")
    s.add_argument("--out", type=_out_path, default="view.png", help="with --draw: the PNG to write (default view.png)")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    s.add_argument("--num-samples", type=_int_in(1, 4096), default=1, help="sample several continuations as one batch")
    s.add_argument("--compile", action="store_true", help="torch.compile the one-token step: ~20 s to start, then ~1.3x faster")
    s.add_argument("--draft", metavar="RUN", help="speculative decoding: a smaller run with the same tokenizer proposes, "
                   "this one verifies (same greedy output)")
    s.add_argument("--lookup", action="store_true", help="speculative decoding with prompt-lookup drafts (no draft model)")
    s.add_argument("--medusa", action="store_true", help="decode with the run's Medusa heads (`worldloom tune medusa`): "
                   "a tree of their guesses verified in one pass")
    s.add_argument("--draft-tokens", type=_int_in(1, 64), default=4, metavar="K",
                   help="most tokens proposed per verification (adapts down when drafts fail; default 4)")
    s.add_argument("--quiet", action="store_true", help="no closing tokens/s line on stderr")
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("fill", help="fill <mask> spans of a text (runs trained with train.objective=masked or combined)",
                       epilog="examples:\n  worldloom fill runs/both \"To be, or not to <mask><mask>, that is the question\"\n"
                              "  worldloom fill runs/both \"O Romeo, <mask>omeo\" --parallel\n\n"
                              "Each <mask> becomes one token (one character for char tokenizers), chosen by a bidirectional pass.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="run folder trained with train.objective=masked or combined")
    s.add_argument("text", help="text with <mask> where tokens should go")
    s.add_argument("--parallel", action="store_true", help="fill every mask from one pass (default: one at a time, most confident first)")
    s.set_defaults(fn=_cmd_fill)

    s = sub.add_parser("eval", help="evaluate a run: held-out loss (text) or success and world-model accuracy (world)")
    s.add_argument("run", help="run folder")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    s.add_argument("--episodes", type=_int_in(1, 10**6), help="world runs: real-environment episodes on held-out seeds (default eval.episodes)")
    s.add_argument("--plan-episodes", type=_int_in(0, 10**6), help="world runs: episodes acted by planning in imagination (0 = skip)")
    s.add_argument("--data", help="evaluate on the held-out part of another text file")
    s.add_argument("--tasks", metavar="FILE", help="text runs: exact-answer accuracy on the task rows of a JSONL file (worldloom data instruct's test.jsonl)")
    s.add_argument("--baseline", metavar="RUN", help="with --tasks: answer the same rows with this run too and report the win-rate")
    s.add_argument("--icl", metavar="FILE", help="text runs: in-context learning, accuracy with k solved examples of the query's "
                   "family in the prompt (worldloom data icl's test.jsonl, or an instruct test.jsonl); docs/icl.md")
    s.add_argument("--shots", default="0,1,4,8", help="with --icl: comma-separated example counts (default 0,1,4,8)")
    s.add_argument("--queries", type=_int_in(1, 10**6), default=400, help="with --icl: queries, spread evenly over the families (default 400)")
    s.add_argument("--seed", type=_int_in(0), default=0, help="with --icl: picks the queries and their examples (the same for every k)")
    s.add_argument("--batch-size", type=_int_in(1, 2**20), default=16)
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("imagine", help="a GIF of the world model imagining an episode beside the real one")
    s.add_argument("run", help="world run folder, e.g. runs/babyai")
    s.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="environment seed of the real episode (its first frame starts the imagination)")
    s.add_argument("--steps", type=_int_in(1, 10**4), default=20, help="steps to imagine (the real episode may end sooner)")
    s.add_argument("--out", type=_out_path, default="rollout.gif", help="GIF to write")
    s.add_argument("--fast", action="store_true", help="frame-head drafts verified token by token: the same frames, fewer forwards")
    s.set_defaults(fn=_cmd_imagine)

    s = sub.add_parser("tune", help="adapt and align a run: SFT, DPO/IPO, ORPO, reward model, preference pairs, PPO, Medusa heads, draft models",
                       epilog=EPILOG_TUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("method", choices=["sft", "dpo", "orpo", "reward", "prefs", "ppo", "medusa", "draft"],
                   help="sft: supervised fine-tuning on responses | dpo: direct preference optimisation (dpo.loss=ipo: IPO) | "
                        "orpo: SFT + odds ratio, no reference | reward: a Bradley-Terry reward model | prefs: sample and "
                        "label preference pairs | ppo: RL against a reward (world runs: in their environment) | medusa: "
                        "Medusa heads (heads=K) on the run's own generations, base frozen | draft: a small draft model "
                        "(model.* its size) trained on the run's own generations, for generate --draft")
    s.add_argument("run", nargs="?", help="the run to start from")
    s.add_argument("overrides", nargs="*", help="key=value: data.path=..., lora.rank=8, dpo.beta=0.1, train.max_steps=..., name=...")
    s.add_argument("--resume", metavar="TUNED_RUN", help="continue a tuning run in this folder from its last checkpoint")
    s.add_argument("--samples", type=_int_in(2, 64), default=4, help="prefs: samples per prompt (default 4)")
    s.add_argument("--out", type=_out_path, help="prefs: output folder of the preference pairs")
    s.add_argument("--no-progress", action="store_true", help="print a line per evaluation instead of a progress bar")
    s.set_defaults(fn=_cmd_tune)

    s = sub.add_parser("quantize", help="quantise a text run: weight-only int8 (no training) or ternary BitNet b1.58 (QAT)",
                       epilog="examples:\n  worldloom quantize runs/big --bits 8 name=big-int8\n"
                              "  worldloom quantize runs/big --bits 1.58 name=big-ternary train.max_steps=2000\n\n"
                              "--bits 1.58 fine-tunes on the run's own text (train.* as for `train`); docs/decoding.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="the text run to quantise")
    s.add_argument("overrides", nargs="*", help="name=..., out_dir=...; with --bits 1.58 also train.* (max_steps, lr, ...)")
    s.add_argument("--bits", required=True, help="8: weight-only int8 | 1.58: ternary (BitNet b1.58) quantisation-aware fine-tuning")
    s.add_argument("--no-progress", action="store_true", help="print a line per evaluation instead of a progress bar")
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("data", help="make a dataset: synthetic instruction tasks with programmatic checkers, or ICL episodes")
    kinds = s.add_subparsers(dest="kind", metavar="KIND", required=True)
    d = kinds.add_parser("instruct", help="checkable instruction tasks as JSONL (train/test/prompts) plus a pretraining text",
                         epilog="examples:\n  worldloom data instruct --tasks arith,reverse,sort,count --n 20000 --out data/instr\n"
                                "  worldloom data instruct --tasks babyai --n 5000 --test-n 500 --out data/views --seed 1\n\n"
                                "Families: arith, reverse, sort, count, babyai (questions about a described BabyAI view). "
                                "A prompt is a test prompt iff sha256(prompt) % 10 == 0, so no test prompt is ever trained on.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--tasks", help="comma-separated task families (default: all five)")
    d.add_argument("--n", type=_int_in(1, 10**7), default=20000, help="training rows, split evenly over the families")
    d.add_argument("--out", type=_out_path, default="data/instr", help="output folder (new, empty, or an earlier output)")
    d.add_argument("--seed", type=_int_in(0), default=0)
    d.add_argument("--test-n", type=_int_in(1, 10**7), help="held-out rows (default max(100, n // 10))")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=_cmd_data)
    d = kinds.add_parser("icl", help="in-context learning: episodes of string rules to infer from examples; held-out compositions",
                         epilog="example:\n  worldloom data icl --out data/icl && worldloom train icl name=icl && "
                                "worldloom eval runs/icl --icl data/icl/test.jsonl\n\ndocs/icl.md",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", type=_out_path, default="data/icl", help="output folder (new, empty, or an earlier output)")
    d.add_argument("--n", type=_int_in(1, 10**7), default=60000, help="training episodes in train.txt (default 60000)")
    d.add_argument("--families", type=_int_in(1, 10**4), default=4, help="held-out families per test kind (default 4)")
    d.add_argument("--rows", type=_int_in(2, 10**4), default=24, help="rows per family in test.jsonl and seen.jsonl (default 24)")
    d.add_argument("--seed", type=_int_in(0), default=0)
    d.set_defaults(fn=_cmd_data)

    d = kinds.add_parser("react", help="synthetic ReAct traces (calculator) for held-out multi-step arithmetic",
                         epilog="example:\n  worldloom data react --n 20000 --out data/react\n\n"
                                "Each question twice: with tools (the whole trace, Observations from the calculator) "
                                "and without (the direct answer). docs/agents.md.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--n", type=_int_in(1, 10**7), default=20000, help="training questions (two rows each)")
    d.add_argument("--out", type=_out_path, default="data/react", help="output folder (new, empty, or an earlier output)")
    d.add_argument("--seed", type=_int_in(0), default=0)
    d.add_argument("--test-n", type=_int_in(1, 10**7), help="held-out questions (default max(100, n // 10))")
    d.set_defaults(fn=_cmd_data_react)

    s = sub.add_parser("agent", help="answer a question with a ReAct loop: the model thinks, calls tools, observes",
                       epilog="examples:\n  worldloom agent runs/react --tools calculator \"what is (23+58)*4-17?\"\n"
                              "  worldloom agent runs/react --tools calculator,world=runs/babyai,env \"...\" --json\n\n"
                              "Tools: calculator; world=RUN (imagine: the world model); env[=ENV_ID] (act: the real "
                              "environment). No --tools: the model must answer directly. docs/agents.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="a text run tuned on ReAct traces")
    s.add_argument("question", help="the question")
    s.add_argument("--tools", default="", help="comma-separated: calculator, world=RUN, env[=ENV_ID] (default: none)")
    s.add_argument("--max-steps", type=_int_in(1, 100), default=8, help="most tool calls (default 8)")
    s.add_argument("--max-new-tokens", type=_int_in(1, 10**5), default=128, help="most tokens per model turn")
    s.add_argument("--temperature", type=_float_in(1e-3, 1e6, zero=True), default=0.0, help="0 = greedy (default)")
    s.add_argument("--seed", type=_int_in(0), default=None, help="sampling seed")
    s.add_argument("--json", action="store_true", help="print the result (answer, steps, trace, stop reason) as JSON")
    s.set_defaults(fn=_cmd_agent)

    s = sub.add_parser("export", help="export a run to another format")
    s.add_argument("format", choices=["hf"], help="hf: a transformers LlamaForCausalLM folder")
    s.add_argument("run", help="run folder")
    s.add_argument("out", type=_out_path, help="output folder")
    s.add_argument("--merged", action="store_true", help="a LoRA run: fold its adapters into the weights (default: the base + a PEFT adapter folder in OUT/adapter)")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("lora", help="LoRA runs: merge the adapters into a plain run folder",
                       epilog="example:\n  worldloom lora merge runs/dpo out/merged   # loads, generates, exports and tunes as any run",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=["merge"], help="merge: write a plain, self-contained run with the adapters folded in")
    s.add_argument("run", help="a LoRA run folder (lora.rank >= 1)")
    s.add_argument("out", type=_out_path, help="the new run folder (must not exist, or be empty)")
    s.set_defaults(fn=_cmd_lora)

    s = sub.add_parser("import", help="import a model from another format as a run folder",
                       epilog="example:\n  worldloom import hf path/to/llama-folder name=base out_dir=runs   # docs/interop.md",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("format", choices=["hf"], help="hf: a local transformers LlamaForCausalLM folder (config.json, *.safetensors, tokenizer.json)")
    s.add_argument("path", help="the folder to import (nothing is downloaded)")
    s.add_argument("overrides", nargs="*", help="name=..., out_dir=..., model.context=... (default name: the folder's name)")
    s.set_defaults(fn=_cmd_import)

    s = sub.add_parser("serve", help="serve runs over HTTP: OpenAI-compatible completions/chat, world sessions (docs/serving.md)")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folders (text and world runs; each served under its folder's name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_int_in(0, 65535), default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: open)")
    s.add_argument("--max-batch", type=_int_in(1, 1024), default=16, help="rows decoded together per model")
    s.add_argument("--max-queue", type=_int_in(1, 100_000), default=64, help="requests that may wait; more get 503")
    s.add_argument("--max-sessions", type=_int_in(1, 10_000), default=32, help="open sessions per world run")
    s.add_argument("--session-ttl", type=_float_in(1, 86_400), default=600.0, help="seconds before an unused session expires")
    s.add_argument("--threads", type=_int_in(0, 4096), default=0, help="torch threads (default 0: every core)")
    s.set_defaults(fn=_cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from .runtime import flush_denormals

    flush_denormals()  # before torch starts its worker threads: they inherit the mode
    try:
        args = parse_args(argv)
    except SystemExit as e:  # a usage error (one line on stderr, status 2) or --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    code = None
    try:
        code = args.fn(args)
        return code
    except KeyboardInterrupt:
        print("worldloom: interrupted", file=sys.stderr)
        code = 130
        return code
    except Exception as e:  # noqa: BLE001 - re-raised below unless the user can act on it
        from .train.dist import peer_failed

        if peer_failed(e):
            print("worldloom: error: another rank of this torchrun job stopped (its message is above)", file=sys.stderr)
            code = 1
            return code
        message = user_error(e)
        if message is None:
            raise
        print(f"worldloom: error: {message}", file=sys.stderr)
        code = 2
        return code
    finally:
        if _leave_process_group() and code is not None and argv is None:  # a program (torchrun's rank), not a caller
            _exit_now(code)


def run_captured(argv: list[str]) -> tuple[int, str]:
    """``worldloom ARGV`` in this process with its stdout captured: (exit status, stdout). For scripts that run
    many commands (the benchmarks): one interpreter and one torch import for all of them."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def _leave_process_group() -> bool:
    """End the torchrun process group a verb joined (train under train.dist), if any; whether it did."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


def _exit_now(code: int | None) -> None:
    """Leave a torchrun rank without the interpreter's teardown. Objects that still hold the destroyed
    gloo group (DDP, the FSDP mesh) are otherwise freed during finalisation, where gloo's worker
    threads can abort the process (SIGABRT, "terminate called without an active exception"; about
    seen intermittently on loaded 2-core machines, e.g. in CI; pytorch/pytorch#179291 describes the race). The
    run's files are closed and renamed by then; only stdio needs flushing."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "verb", None) == "generate" and not args.prompt and len(extra) == 1 and not extra[0].startswith("-"):
        args.prompt, extra = extra[0], []  # `generate RUN --view seed=3 "PROMPT"`: the prompt after an option
    if extra:  # argparse stops filling `overrides` at the first option: `train preset --no-progress key=value`
        if getattr(args, "verb", None) in ("train", "collect", "tune", "import", "quantize") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "fn", None):
        parser.error(f"choose a verb: {', '.join(VERBS)}")
    return args


VERBS = ("presets", "train", "collect", "generate", "fill", "eval", "imagine", "tune", "export", "lora", "import", "data",
         "serve", "quantize", "agent")
_OOM = ("not enough memory", "can't allocate memory", "out of memory", "defaultcpuallocator")


def user_error(e: BaseException) -> str | None:
    """The one line to print for an exception the user can act on; None for a bug (it keeps its traceback).

    Besides WorldloomError: the machine refusing a file operation (a read-only or odd output
    place, a full disk) and an allocation the machine cannot serve."""
    if isinstance(e, WorldloomError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else "a file"
        return f"cannot use {where}: {e.strerror} (choose another out_dir / --out, or check the path)"
    text = str(e).lower()
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and any(k in text for k in _OOM)):
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return f"out of memory ({first}); use a smaller model, train.batch_size or --batch-size"
    return None


if __name__ == "__main__":
    sys.exit(main())
