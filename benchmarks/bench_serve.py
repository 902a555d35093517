#!/usr/bin/env python
"""Load test of `worldloom serve` (issue 15): N concurrent streaming clients against a real uvicorn on
loopback, with continuous batching (--max-batch B) and one request at a time (--max-batch 1).

    python benchmarks/bench_serve.py                       # 32 clients x 64 tokens, a random ~3M-parameter model
    python benchmarks/bench_serve.py --run runs/chat --clients 64 --max-tokens 128
    python benchmarks/bench_serve.py --quick               # 4 clients x 8 tokens, a tiny model (smoke test)

For each mode a fresh server process is started (`python -m worldloom serve RUN --max-batch B`); every
client sends one streaming `/v1/completions` request at once (a different prompt each, temperature 1,
seeded, ``stream_options.include_usage``) and reads it to the end. Each mode is bounded by --timeout
seconds: requests still running then are cancelled and counted as unfinished. Reported per mode:

* errors: HTTP statuses other than 200, broken streams, missing ``[DONE]`` (the target is 0);
* tokens/s: completion tokens (from the usage chunks) / wall time from the first request to the last token;
* time to first token and inter-token latency (gaps between a stream's chunks that carry text), p50 and p99;
* the server's resident memory: after loading (VmRSS before the load) and its peak (VmHWM), from /proc.

and the speed-up of continuous batching over one at a time. Figures depend on the machine and on what
else runs on it; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8


def log(msg: str = "") -> None:
    print(msg, flush=True)


def random_run(folder: Path, d_model: int, layers: int, context: int) -> Path:
    """A text run with random weights (the load does not depend on what the model learned), whose head
    never favours byte-fallback tokens: a stream of lone bytes would be held back as incomplete UTF-8."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from worldloom.checkpoint import save_checkpoint
    from worldloom.config import ModelConfig, RunConfig, save_yaml, to_dict
    from worldloom.model import LWM
    from worldloom.tokenize import TextTokenizer

    tok = TextTokenizer.train("char", TEXT, vocab_size=300)
    mc = ModelConfig(n_layer=layers, d_model=d_model, n_head=max(1, d_model // 64), context=context,
                     vocab_size=tok.vocab_size, tie_weights=False)
    cfg = RunConfig(name=folder.name, out_dir=str(folder.parent), model=mc)
    model = LWM(mc)
    with torch.no_grad():
        byte = torch.tensor([tok.tok.id_to_token(i).startswith("<0x") for i in range(tok.vocab_size)])
        model.head.weight.normal_(0.0, 5.0 / d_model**0.5)
        model.head.weight[byte] = 0.0
    save_checkpoint(folder, model, None, {"step": 0, "elapsed": 0.0})
    tok.save(folder / "tokenizer")
    save_yaml(to_dict(cfg), folder / "config.yaml")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_memory_mb(pid: int) -> dict:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), MiB (Linux /proc)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def start_server(run: Path, max_batch: int, queue: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return launch([sys.executable, "-m", "worldloom", "serve", str(run), "--port", str(port), "--max-batch", str(max_batch),
                   "--max-queue", str(queue), "--threads", str(threads)], port, "/health", env)


def start_llama_cpp(python: str, gguf: Path, threads: int, context: int) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) on the same model as GGUF."""
    port = free_port()
    return launch([python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench", "--port", str(port),
                   "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(context),
                   "--interrupt_requests", "False"],  # queue concurrent requests (its default cuts the running stream)
                  port, "/v1/models", dict(os.environ))


def launch(cmd: list[str], port: int, ready: str, env: dict) -> tuple[subprocess.Popen, str]:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + ready, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 120 s")


async def one_client(client, url: str, model: str, i: int, max_tokens: int, t0: float) -> dict:
    """One streaming request read to the end: its chunk times, token count and error (if any)."""
    body = {"model": model, "prompt": TEXT[i % 40: i % 40 + 24], "max_tokens": max_tokens, "temperature": 1.0,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    rec = {"times": [], "tokens": 0, "chunks": 0, "error": None, "done": False}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec["done"] = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["error"] = chunk["error"]["message"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    rec["times"].append(time.perf_counter() - t0)
                    rec["chunks"] += 1
                elif chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
        if not rec["tokens"]:  # a server that sends no usage chunk: one token per text chunk
            rec["tokens"] = rec["chunks"]
        if not rec["done"] and rec["error"] is None:
            rec["error"] = "stream ended without [DONE]"
    except Exception as e:  # noqa: BLE001 - a failed client is a counted error, not the end of the benchmark
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


async def load(url: str, model: str, clients: int, max_tokens: int, timeout: float) -> tuple[list[dict], float, int]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout + 10, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one_client(client, url, model, i, max_tokens, t0)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return [t.result() for t in done], time.perf_counter() - t0, len(pending)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


def summarize(recs: list[dict], unfinished: int) -> dict:
    ttft = [r["times"][0] for r in recs if r["times"]]
    gaps = [b - a for r in recs for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in recs)
    end = max((r["times"][-1] for r in recs if r["times"]), default=0.0)
    errors = [r["error"] for r in recs if r["error"]]
    return {"requests": len(recs) + unfinished, "finished": len(recs) - len(errors), "unfinished": unfinished,
            "errors": len(errors), "error_examples": errors[:3], "completion_tokens": tokens,
            "wall_s": round(end, 3), "tokens_per_s": round(tokens / end, 1) if end else None,
            "ttft_ms": {"p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
            "itl_ms": {"p50": pct(gaps, 0.5), "p99": pct(gaps, 0.99)}}


def run_mode(run: Path, max_batch: int, args, peer: bool = False) -> dict:
    if peer:
        proc, url = start_llama_cpp(args.peer_python, args.peer_gguf, args.threads, args.context)
    else:
        proc, url = start_server(run, max_batch, max(args.clients, 1), args.threads)
    try:
        loaded = proc_memory_mb(proc.pid)
        model = "bench" if peer else run.name
        recs, _, unfinished = asyncio.run(load(url, model, args.clients, args.max_tokens, args.timeout))
        out = summarize(recs, unfinished)
        out.update(max_batch=max_batch, rss_loaded_mb=loaded.get("VmRSS"), rss_peak_mb=proc_memory_mb(proc.pid).get("VmHWM"))
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a text run folder (default: a random model made for the benchmark)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32, help="the continuous-batching server's --max-batch")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per mode; requests still running are cancelled")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server (its --threads)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="4 clients x 8 tokens, a tiny model: checks the script works")
    p.add_argument("--peer-gguf", type=Path, help="the same model as GGUF: also load llama-cpp-python's server with it "
                   "(docs: BENCHMARKS.md 'Serving'; the model must be the one --run names, exported and converted)")
    p.add_argument("--peer-python", default=sys.executable, help="a Python with llama-cpp-python[server] installed")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.max_tokens, args.d_model, args.layers, args.context = 4, 8, 32, 1, 64
        args.max_batch, args.timeout, args.threads = 4, 60.0, 1
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or random_run(Path(tmp) / "bench", args.d_model, args.layers, args.context)
        modes = {}
        plan = [("continuous", args.max_batch, False), ("one_at_a_time", 1, False)]
        if args.peer_gguf:
            if not args.run:
                raise SystemExit("--peer-gguf needs --run: the GGUF file must hold the same model")
            plan.append(("llama_cpp_python", 1, True))
        for name, batch, peer in plan:
            log(f"{name}: {args.clients} clients x {args.max_tokens} tokens" + ("" if peer else f", --max-batch {batch}"))
            modes[name] = run_mode(run, batch, args, peer)
            m = modes[name]
            log(f"  errors {m['errors']}, unfinished {m['unfinished']}, {m['tokens_per_s']} tokens/s, "
                f"TTFT p50/p99 {m['ttft_ms']['p50']}/{m['ttft_ms']['p99']} ms, "
                f"ITL p50/p99 {m['itl_ms']['p50']}/{m['itl_ms']['p99']} ms, RSS peak {m['rss_peak_mb']} MiB")
    a, b = modes["continuous"]["tokens_per_s"], modes["one_at_a_time"]["tokens_per_s"]
    result = {"quick": args.quick, "clients": args.clients, "max_tokens": args.max_tokens,
              "model": str(args.run) if args.run else {"d_model": args.d_model, "layers": args.layers, "context": args.context},
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version()},
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "modes": modes,
              "speedup": round(a / b, 2) if a and b else None,
              "vs_llama_cpp": (round(a / modes["llama_cpp_python"]["tokens_per_s"], 2)
                               if "llama_cpp_python" in modes and modes["llama_cpp_python"]["tokens_per_s"] else None),
              "zero_errors": all(m["errors"] == 0 and m["unfinished"] == 0 for m in modes.values())}
    log(f"continuous batching: {result['speedup']}x the tokens/s of one at a time; 0 errors: {result['zero_errors']}")
    if result["vs_llama_cpp"]:
        log(f"continuous batching: {result['vs_llama_cpp']}x the tokens/s of llama-cpp-python's server on the same model")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0 if result["zero_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
