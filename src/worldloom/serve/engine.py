"""Continuous batching: one decode loop per served text model, holding one running batch.

Requests (`Job`: a prompt, its sampling settings and ``n`` choices) wait in a bounded queue
(full: `QueueFull`, which the server answers with 503). Between two decoding steps the loop

1. drops the rows that finished or whose client went away (``KVCache.select``, then `rows.compact`),
2. feeds every remaining row its last token (one forward for the whole batch),
3. admits waiting jobs while the batch has room: their prompts are prefilled together (left
   padding), each prompt's cache row repeated for its ``n`` choices, and joined to the batch
   (`rows.join`: any backbone),
4. samples the next token of every row with the row's own settings and generator (so a request's
   seed gives the same output whatever else is in the batch, up to rounding),

then hands each row's new text (`inference.textstream.TextStream`: stop strings, UTF-8) and log-probabilities to
its job's asyncio queue. The model work (steps 1-4) runs in one worker thread per model, so the
event loop keeps serving; everything else runs on the event loop, which owns the rows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..decode import left_pad
from ..inference.sampling import sample
from .rows import compact, join, retention_thetas
from ..inference.textstream import TextStream

log = logging.getLogger("worldloom.serve")


class QueueFull(Exception):
    """The waiting queue is full: the request is refused (503) instead of growing memory."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's log-probability and the k likeliest


@dataclass
class Event:
    """New output of one choice: text, its tokens' log-probabilities, and the finish reason at its end."""

    index: int
    text: str
    logprobs: list = field(default_factory=list)  # (token id, log-prob, [(id, log-prob) x top])
    finish_reason: str | None = None


class Job:
    """One request: ``n`` rows sharing a prompt; its events arrive on ``queue`` (None at the end)."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, n: int = 1, index0: int = 0):
        self.prompt_ids, self.sampling, self.n, self.index0 = list(prompt_ids), sampling, n, index0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.error: str | None = None
        self.open = n  # rows not finished yet
        self.t0 = time.monotonic()
        self.first_token: float | None = None
        self.generated = 0


class Row:
    def __init__(self, job: Job, index: int, tokenizer):
        s = job.sampling
        self.job, self.index = job, index
        self.stream = TextStream(tokenizer, s.stop)
        self.generator = torch.Generator()
        seed = s.seed + index if s.seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.generator.manual_seed(seed)
        self.last: int | None = None
        self.lp: list = []  # per generated token: (id, log-prob, top alternatives), when asked for
        self.generated = 0
        self.done = False
        self.t_last: float | None = None

    @property
    def gone(self) -> bool:
        return self.done or self.job.cancelled


class Engine:
    """The decode loop of one model (see the module doc). ``batch_sizes`` counts rows per step."""

    def __init__(self, name: str, model, tokenizer, max_batch: int = 16, max_queue: int = 64, metrics=None):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self.context = model.cfg.context
        self.thetas = retention_thetas(model)
        self.pending: deque[Job] = deque()
        self.rows: list[Row] = []
        self.cache = None
        self.batch_sizes: dict[int, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode-{name}")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ the event loop's side

    def submit(self, job: Job) -> None:
        """Queue a job (QueueFull when ``max_queue`` jobs already wait); starts the loop on first use."""
        if len(self.pending) >= self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc(model=self.name)
            raise QueueFull(f"the queue of model {self.name!r} is full ({self.max_queue} requests waiting); retry later")
        self.pending.append(job)
        self._gauge()
        self._ensure_running()
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The client went away: its rows leave the batch at the next step, a waiting job is dropped."""
        if job.cancelled or job.open == 0:
            return
        job.cancelled = True
        if job in self.pending:
            self.pending.remove(job)
        if self.metrics:
            self.metrics.cancelled.inc(job.open, model=self.name)
        if self._wake:
            self._wake.set()

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        if self._task is not None and self._task.get_loop() is not loop:  # a new event loop (tests): start afresh
            self.rows, self.cache = [], None
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._loop(), name=f"decode-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue.set(len(self.pending), model=self.name)
            self.metrics.running.set(sum(not r.gone for r in self.rows), model=self.name)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not any(not r.gone for r in self.rows) and not self.pending:
                self.rows = []
                self._gauge()
                self._wake.clear()
                await self._wake.wait()
                continue
            keep = [i for i, r in enumerate(self.rows) if not r.gone]
            jobs = self._admit(len(keep))
            if not keep and not jobs:  # only finished rows were left: nothing to decode
                self.rows, self.cache = [], None
                continue
            new_rows = [Row(j, j.index0 + k, self.tokenizer) for j in jobs for k in range(j.n)]
            feed = [self.rows[i].last for i in keep]
            try:
                out = await loop.run_in_executor(self._pool, self._advance, keep, feed, jobs, new_rows)
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests with an error, not the server
                self._fail([self.rows[i] for i in keep] + new_rows, e)
                continue
            self.rows = [self.rows[i] for i in keep] + new_rows
            self._deliver(*out)

    def _admit(self, running: int) -> list[Job]:
        jobs = []
        while self.pending and running + self.pending[0].n <= self.max_batch:
            job = self.pending.popleft()
            if job.cancelled:
                continue
            jobs.append(job)
            running += job.n
        return jobs

    def _fail(self, rows: list[Row], e: Exception) -> None:
        log.error("model %s: a decoding step failed", self.name, exc_info=e)
        message = f"decoding failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        for job in {id(r.job): r.job for r in rows}.values():
            job.error, job.open = message, 0
            job.queue.put_nowait(None)
        self.rows, self.cache = [], None

    def _deliver(self, tokens: list[int], logprobs: list) -> None:
        now = time.monotonic()
        if self.metrics:
            self.metrics.completion_tokens.inc(len(tokens), model=self.name)
        for row, tok, lp in zip(self.rows, tokens, logprobs):
            job = row.job
            if job.first_token is None:
                job.first_token = now
                if self.metrics:
                    self.metrics.ttft.observe(now - job.t0, model=self.name)
            if self.metrics and row.t_last is not None:
                self.metrics.itl.observe(now - row.t_last, model=self.name)
            row.t_last, row.last = now, tok
            row.generated += 1
            job.generated += 1
            row.lp.append(lp)
            text = row.stream.push(tok)
            reason = "stop" if row.stream.stopped else ("length" if row.generated >= job.sampling.max_tokens else None)
            if reason == "length":
                text += row.stream.flush()
            covered = row.stream.covered(final=reason is not None)
            entries = [row.lp[j] for j in covered] if job.sampling.logprobs is not None else []
            if job.cancelled:
                continue
            if text or entries or reason:
                job.queue.put_nowait(Event(row.index, text, entries, reason))
            if reason:
                row.done = True
                job.open -= 1
                if job.open == 0:
                    self._finish(job, now)
        self._gauge()

    def _finish(self, job: Job, now: float) -> None:
        if self.metrics:
            self.metrics.latency.observe(now - job.t0, model=self.name)
        job.queue.put_nowait(None)

    # ------------------------------------------------------------------ the worker thread's side

    @torch.inference_mode()
    def _advance(self, keep: list[int], feed: list[int], jobs: list[Job], new_rows: list[Row]):
        """Steps 1-4 of the module doc; returns the sampled token and log-probabilities of every row."""
        logits = []
        if keep:
            if len(keep) < self.cache.batch:
                self.cache = compact(self.cache.select(torch.tensor(keep)))
            logits.append(self.model(torch.tensor(feed)[:, None], self.cache).logits[:, -1])
        elif self.cache is not None and self.cache.batch:
            self.cache = None
        if jobs:
            cache, first = self._prefill(jobs)
            self.cache = cache if self.cache is None else join(self.cache, cache, self.thetas)
            logits.append(first)
        logits = torch.cat(logits)  # (B, V)
        rows = [self.rows[i] for i in keep] + new_rows
        self.batch_sizes[len(rows)] = self.batch_sizes.get(len(rows), 0) + 1
        if self.metrics:
            self.metrics.batch.observe(len(rows), model=self.name)
            self.metrics.prompt_tokens.inc(sum(len(j.prompt_ids) for j in jobs), model=self.name)
        return self._sample(logits, rows)

    def _prefill(self, jobs: list[Job]):
        """The jobs' prompts in one left-padded pass; each prompt's row repeated for its n choices."""
        ids, pad = left_pad([j.prompt_ids for j in jobs])
        cache = self.model.new_cache(len(jobs), self.context, pad)
        logits = self.model(ids, cache).logits[:, -1]  # (J, V)
        rows = torch.tensor([i for i, j in enumerate(jobs) for _ in range(j.n)])
        if len(rows) != len(jobs):
            cache, logits = cache.select(rows), logits[rows]
        return cache, logits

    def _sample(self, logits: torch.Tensor, rows: list[Row]):
        tokens, lps = [], []
        logp = torch.log_softmax(logits.float(), dim=-1) if any(r.job.sampling.logprobs is not None for r in rows) else None
        for i, row in enumerate(rows):
            s = row.job.sampling
            tok = int(sample(logits[i : i + 1], s.temperature, top_p=s.top_p, generator=row.generator)[0])
            tokens.append(tok)
            if s.logprobs is None:
                lps.append(None)
                continue
            top = torch.topk(logp[i], min(s.logprobs, logp.shape[-1])) if s.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            lps.append((tok, float(logp[i, tok]), alts))
        return tokens, lps
