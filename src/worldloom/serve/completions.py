"""`/v1/completions` and `/v1/chat/completions`: requests checked, turned into engine jobs, answered
whole or streamed as server-sent events (``data: {json}`` lines, then ``data: [DONE]``).

The two endpoints differ only in how the prompt is made (text as given; chat messages through
the run's template, `prompt_of_messages`) and how a piece of output is written (`Completion`,
`Chat`: a choice's ``text`` or ``delta``, and their log-probability layouts).
"""

from __future__ import annotations

import asyncio
import json
import time

from .engine import Event, Job, QueueFull, Sampling
from .protocol import APIError, ChatRequest, CompletionRequest, new_id, now, usage

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


def prompt_of_messages(served, messages) -> str:
    """Chat messages as the run's template renders them (tune.prompt_format / tune.stop), ready for the answer."""
    cfg = served.run.cfg
    if not cfg.tune.base:
        raise APIError(400, f"model {served.name!r} has no chat template (it was not tuned with `worldloom tune`); "
                            "use /v1/completions with a plain prompt", param="model", code="no_chat_template")
    if messages[-1].role != "user":
        raise APIError(400, f"the last message is the {messages[-1].role}'s; chat needs a user message last", param="messages")
    from ..tune.data import render_turn

    return "".join(render_turn(m.role, m.text(), cfg.tune.prompt_format, cfg.tune.stop) for m in messages)


def _token_budget(req, served, n_prompt: int, default: int | None) -> int:
    """max_tokens checked against the context (400 when it cannot fit); the default fills what is left."""
    ctx = served.context
    if n_prompt >= ctx:
        raise APIError(400, f"the prompt is {n_prompt} tokens; model {served.name!r} has a context of {ctx} tokens "
                            "(it needs room for at least one new token)", param="prompt", code="context_length_exceeded")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is None:
        return ctx - n_prompt if default is None else min(default, ctx - n_prompt)
    if asked <= 0:
        raise APIError(400, f"max_tokens must be at least 1, got {asked}", param="max_tokens")
    if n_prompt + asked > ctx:
        raise APIError(400, f"max_tokens {asked} + the prompt's {n_prompt} tokens exceed the context of {ctx} tokens; "
                            f"ask for at most {ctx - n_prompt}", param="max_tokens", code="context_length_exceeded")
    return asked


def make_jobs(served, req, prompts: list[str], logprobs: int | None, default_tokens: int | None,
              stops: list[str]) -> list[Job]:
    """One job per prompt (each with n rows), validated before any is queued; ``stops`` besides the request's."""
    n = req.n or 1
    if n > served.engine.max_batch:
        raise APIError(400, f"n={n} is more than this server's batch of {served.engine.max_batch} rows (--max-batch)", param="n")
    if getattr(req, "echo", False):
        raise APIError(400, "echo is not supported", param="echo")
    stops = req.stops() + [s for s in stops if s not in req.stops()]
    jobs = []
    for i, text in enumerate(prompts):
        ids = served.tokenizer.encode(text).tolist() if text else []
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one character", param="prompt")
        budget = _token_budget(req, served, len(ids), default_tokens)
        s = Sampling(budget, 1.0 if req.temperature is None else req.temperature, req.top_p or 1.0, stops,
                     req.seed, logprobs)
        jobs.append(Job(ids, s, n, index0=i * n))
    return jobs


def submit(engine, jobs: list[Job]) -> None:
    """Queue every job, or none (503 when the queue is full)."""
    for k, job in enumerate(jobs):
        try:
            engine.submit(job)
        except QueueFull as e:
            for done in jobs[:k]:
                engine.cancel(done)
            raise APIError(503, str(e), type="server_error", code="queue_full") from None


async def events(jobs: list[Job], engine, request=None):
    """The jobs' events as they come (a job error raises); cancels every job if the consumer stops
    (a stream's client went away) or, for a whole answer, when ``request`` reports a disconnect."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job):
        while (ev := await job.queue.get()) is not None:
            await queue.put(ev)
        await queue.put(job)

    tasks = [asyncio.create_task(pump(j)) for j in jobs]
    left, checked = len(jobs), time.monotonic()
    try:
        while left:
            try:
                item = await asyncio.wait_for(queue.get(), 0.5)
            except asyncio.TimeoutError:
                item = None
            if request is not None and time.monotonic() - checked > 0.5:  # a client that left frees its rows
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if item is None:
                continue
            if isinstance(item, Job):
                left -= 1
                if item.error:
                    raise APIError(500, item.error, type="server_error")
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()
        for j in jobs:
            engine.cancel(j)


class Completion:
    """How /v1/completions writes its output."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, tokenizer):
        self.tokenizer, self.offsets = tokenizer, {}

    def start(self, index: int) -> dict | None:
        return None

    def piece(self, ev: Event) -> dict:
        return {"index": ev.index, "text": ev.text, "logprobs": self.logprobs(ev), "finish_reason": ev.finish_reason}

    def logprobs(self, ev: Event) -> dict | None:
        if not ev.logprobs:
            return None
        off = self.offsets.get(ev.index, 0)
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp, alts in ev.logprobs:
            s = self.tokenizer.decode([tok])
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.tokenizer.decode([a]): v for a, v in alts})
            out["text_offset"].append(off)
            off += len(s)
        self.offsets[ev.index] = off
        return out

    def whole(self, index: int, text: str, logprobs: list, reason: str) -> dict:
        lp = self.logprobs(Event(index, text, logprobs)) if logprobs else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}


class Chat(Completion):
    """How /v1/chat/completions writes its output."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def start(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def piece(self, ev: Event) -> dict:
        delta = {"content": ev.text} if ev.text else {}
        return {"index": ev.index, "delta": delta, "logprobs": self.logprobs(ev), "finish_reason": ev.finish_reason}

    def logprobs(self, ev: Event) -> dict | None:
        if not ev.logprobs:
            return None

        def entry(tok, lp):
            s = self.tokenizer.decode([tok])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(tok, lp), "top_logprobs": [entry(a, v) for a, v in alts]}
                            for tok, lp, alts in ev.logprobs]}

    def whole(self, index: int, text: str, logprobs: list, reason: str) -> dict:
        lp = self.logprobs(Event(index, text, logprobs)) if logprobs else None
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason}


async def answer(fmt: Completion, name: str, jobs: list[Job], engine, request) -> dict:
    """The whole response of a request that does not stream."""
    texts, lps, reasons = {}, {}, {}
    async for ev in events(jobs, engine, request):
        texts[ev.index] = texts.get(ev.index, "") + ev.text
        lps.setdefault(ev.index, []).extend(ev.logprobs)
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    n_out = sum(j.generated for j in jobs)
    n_in = sum(len(j.prompt_ids) for j in jobs)
    choices = [fmt.whole(i, texts.get(i, ""), lps.get(i, []), reasons.get(i, "stop")) for i in sorted(reasons)]
    return {"id": new_id(fmt.id_prefix), "object": fmt.object, "created": now(), "model": name,
            "choices": choices, "usage": usage(n_in, n_out)}


async def stream(fmt: Completion, name: str, jobs: list[Job], engine, include_usage: bool):
    """Server-sent events: one chunk per piece of output, the usage chunk if asked, then [DONE]."""
    base = {"id": new_id(fmt.id_prefix), "object": fmt.chunk_object, "created": now(), "model": name}
    extra = {"usage": None} if include_usage else {}

    def sse(choices, **more) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra, **more})}\n\n"

    starts = [fmt.start(i) for j in jobs for i in range(j.index0, j.index0 + j.n)]
    if starts[0] is not None:
        yield sse(starts)
    try:
        async for ev in events(jobs, engine):
            yield sse([fmt.piece(ev)])
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        return
    if include_usage:
        n_in, n_out = sum(len(j.prompt_ids) for j in jobs), sum(j.generated for j in jobs)
        yield sse([], usage=usage(n_in, n_out))
    yield "data: [DONE]\n\n"


async def respond(fmt_cls, served, req, prompts: list[str], logprobs: int | None, default_tokens: int | None, request,
                  stops: tuple[str, ...] = ()):
    """Check, queue and answer (a dict) or stream (an async iterator of SSE lines) one request."""
    jobs = make_jobs(served, req, prompts, logprobs, default_tokens, list(stops))
    submit(served.engine, jobs)
    fmt = fmt_cls(served.tokenizer)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return stream(fmt, served.name, jobs, served.engine, include)
    return await answer(fmt, served.name, jobs, served.engine, request)


async def completions(served, req: CompletionRequest, request):
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list", param="prompt")
    return await respond(Completion, served, req, prompts, req.logprobs, DEFAULT_COMPLETION_TOKENS, request)


async def chat(served, req: ChatRequest, request):
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    prompt = prompt_of_messages(served, req.messages)  # an answer ends at the template's stop string
    return await respond(Chat, served, req, [prompt], logprobs, None, request, (served.run.cfg.tune.stop,))
