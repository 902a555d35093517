"""worldloom serve, in process (httpx's ASGI transport): the OpenAI endpoints against the library's own
decoding, SSE framing, every error status, continuous batching, world sessions against the real env.
(tests/test_serve_openai.py drives a real uvicorn process with the official openai client.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'worldloom[serve]')")
httpx = pytest.importorskip("httpx", reason="the serve extra's test client httpx is not installed")

import torch  # noqa: E402
from serve_helpers import text_run  # noqa: E402

from worldloom.decode import SamplingConfig, generate  # noqa: E402
from worldloom.serve.app import Settings, create_app  # noqa: E402

PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    return {"plain": text_run(root / "plain"), "chat": text_run(root / "chat", chat="o"),
            "mamba": text_run(root / "mamba", backbone="mamba"), "retnet": text_run(root / "retnet", backbone="retnet"),
            "world": world_run}


@pytest.fixture(scope="module")
def app(runs):
    return create_app(list(runs.values()), Settings(max_batch=8, max_queue=16, max_sessions=2))


def call(app, fn):
    """Run ``await fn(client)`` against the app in process."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            return await fn(client)

    return asyncio.run(main())


def post(app, path: str, body: dict):
    return call(app, lambda c: c.post(path, json=body))


def reference(app, name: str, prompt: str, n: int, stop=None) -> str:
    """What the library's own decoding (decode.generate) answers, greedily."""
    run = app.state.served[name].run
    return generate(run.model, run.tokenizer, [prompt], SamplingConfig(max_new_tokens=n, temperature=0), stop)[0]


def sse(text: str) -> list:
    """Server-sent events parsed strictly: every event one `data: ` line and a blank line, [DONE] last."""
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


# ------------------------------------------------------------------------------ models, health


def test_models_health_and_worlds(app):
    models = call(app, lambda c: c.get("/v1/models")).json()
    kinds = {m["id"]: (m["kind"], m["chat"]) for m in models["data"]}
    assert kinds == {"plain": ("text", False), "chat": ("text", True), "mamba": ("text", False),
                     "retnet": ("text", False), "world": ("world", False)}
    assert call(app, lambda c: c.get("/health")).json()["status"] == "ok"
    worlds = call(app, lambda c: c.get("/v1/worlds")).json()["data"]
    assert [w["id"] for w in worlds] == ["world"] and "forward" in worlds[0]["actions"]


# ------------------------------------------------------------------------------ completions


@pytest.mark.parametrize("name", ["plain", "mamba", "retnet"])
def test_concurrent_greedy_completions_match_the_library(app, name):
    """Requests decoded together (joining a running batch at different lengths) answer what each answers alone."""
    prompts = [PROMPT, "Whether", "To be, or not to be, that is the question"]
    lens = [24, 10, 17]

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/completions", json={"model": name, "prompt": p, "max_tokens": k,
                                                                      "temperature": 0})
                                      for p, k in zip(prompts, lens)])

    engine = app.state.served[name].engine
    engine.batch_sizes.clear()
    for p, k, r in zip(prompts, lens, call(app, go)):
        body = r.json()
        assert r.status_code == 200, body
        assert body["choices"][0]["text"] == reference(app, name, p, k)
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == k
        assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(p))
    assert max(engine.batch_sizes) >= 2, engine.batch_sizes  # they really shared decoding steps


def test_stop_string_ends_with_finish_reason_stop(app):
    full = reference(app, "plain", PROMPT, 30)
    stop = full[8:10]
    cut = full.index(stop)
    body = post(app, "/v1/completions", {"model": "plain", "prompt": PROMPT, "max_tokens": 30, "temperature": 0,
                                         "stop": [stop, "\x00never"]}).json()
    assert body["choices"][0] == {"index": 0, "text": full[:cut], "logprobs": None, "finish_reason": "stop"}


def test_seed_n_and_logprobs(app):
    req = {"model": "plain", "prompt": PROMPT, "max_tokens": 12, "n": 3, "seed": 7, "logprobs": 2, "temperature": 1.5}
    a, b = post(app, "/v1/completions", req).json(), post(app, "/v1/completions", req).json()
    other = post(app, "/v1/completions", {**req, "seed": 8}).json()
    texts = [c["text"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in b["choices"]]  # same seed, same output
    assert len(set(texts)) > 1 and texts != [c["text"] for c in other["choices"]]
    assert a["usage"]["completion_tokens"] == 36
    for c in a["choices"]:
        lp = c["logprobs"]
        joined = "".join(lp["tokens"])  # a lone byte token reads as U+FFFD
        assert len(lp["tokens"]) == 12 and (joined == c["text"] or "\ufffd" in joined + c["text"])
        assert all(x <= 0 for x in lp["token_logprobs"])
        assert all(1 <= len(t) <= 2 and max(t.values()) >= x - 1e-6 for t, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
        assert lp["text_offset"][0] == 0


def test_logprobs_are_the_model_distribution(app):
    run = app.state.served["plain"].run
    with torch.inference_mode():
        logp = torch.log_softmax(run.model(run.tokenizer.encode(PROMPT)[None]).logits[0, -1].float(), -1)
    top = logp.topk(3)
    body = post(app, "/v1/completions", {"model": "plain", "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                         "logprobs": 3}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [run.tokenizer.decode([int(top.indices[0])])]
    assert lp["token_logprobs"][0] == pytest.approx(float(top.values[0]), abs=1e-4)
    assert sorted(lp["top_logprobs"][0].values()) == pytest.approx(sorted(top.values.tolist()), abs=1e-4)


def test_stream_framing_and_usage_chunk(app):
    want = reference(app, "plain", PROMPT, 15)
    req = {"model": "plain", "prompt": PROMPT, "max_tokens": 15, "temperature": 0, "stream": True,
           "stream_options": {"include_usage": True}}
    r = post(app, "/v1/completions", req)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 15
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == want
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    plain = sse(post(app, "/v1/completions", {**req, "stream_options": None}).text)
    assert all("usage" not in c for c in plain)


# ------------------------------------------------------------------------------ chat


def test_chat_uses_the_run_template(app):
    run = app.state.served["chat"].run
    fmt, stop = run.cfg.tune.prompt_format, run.cfg.tune.stop
    messages = [{"role": "user", "content": "to be?"}, {"role": "assistant", "content": "or not"},
                {"role": "user", "content": "that is"}]
    rendered = fmt.format(prompt="to be?") + "or not" + stop + fmt.format(prompt="that is")
    want = reference(app, "chat", rendered, 20, stop=[stop])
    body = post(app, "/v1/chat/completions", {"model": "chat", "messages": messages, "max_tokens": 20,
                                              "temperature": 0, "logprobs": True, "top_logprobs": 3}).json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want}
    assert choice["finish_reason"] == "stop" and len(run.tokenizer.encode(want)) < 20  # ended at tune.stop
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content).startswith(want)
    assert all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 for e in content)
    stream = sse(post(app, "/v1/chat/completions", {"model": "chat", "messages": messages, "max_tokens": 20,
                                                    "temperature": 0, "stream": True}).text)
    assert stream[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in stream) == want
    assert stream[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_refused_without_a_template(app):
    r = post(app, "/v1/chat/completions", {"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": "plain", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "plain", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "plain", "prompt": "a", "logit_bias": {}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "plain"}, 400, "prompt"),
    ("/v1/completions", {"model": "plain", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "plain", "prompt": "a", "max_tokens": 96}, 400, "max_tokens"),
    ("/v1/completions", {"model": "plain", "prompt": "a" * 96}, 400, "prompt"),
    ("/v1/completions", {"model": "plain", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "plain", "prompt": "a", "n": 9}, 400, "n"),
    ("/v1/completions", {"model": "plain", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "world", "prompt": "a"}, 400, "model"),
    ("/v1/chat/completions", {"model": "chat", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
])
def test_error_statuses_in_openai_shape(app, path, body, status, param):
    r = post(app, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_malformed_json_and_unknown_route(app):
    r = call(app, lambda c: c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = call(app, lambda c: c.get("/v1/nothing"))
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(runs):
    app = create_app([runs["plain"]], Settings(api_key="s3cret"))
    body = {"model": "plain", "prompt": "a", "max_tokens": 2}
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Bearer s3cret"}, 200)):
        r = call(app, lambda c: c.post("/v1/completions", json=body, headers=headers))
        assert r.status_code == status, r.text
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert call(app, lambda c: c.get("/health")).status_code == 200  # probes need no key


def test_full_queue_answers_503(runs):
    app = create_app([runs["plain"]], Settings(max_batch=1, max_queue=1))
    body = {"model": "plain", "prompt": "a", "max_tokens": 90, "temperature": 0}

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(4)])

    replies = call(app, go)
    codes = sorted(r.status_code for r in replies)
    assert codes[0] == 200 and codes[-1] == 503, codes  # one decodes, one waits, the rest are refused
    refused = [r.json()["error"] for r in replies if r.status_code == 503]
    assert all(e["code"] == "queue_full" and e["type"] == "server_error" for e in refused)
    assert app.state.metrics.rejected.get(model="plain") == len(refused)


# ------------------------------------------------------------------------------ metrics


def test_metrics_prometheus_text(app):
    post(app, "/v1/completions", {"model": "plain", "prompt": PROMPT, "max_tokens": 3})
    text = call(app, lambda c: c.get("/metrics")).text
    for name in ("worldloom_requests_total", "worldloom_completion_tokens_total", "worldloom_queue_depth",
                 "worldloom_time_to_first_token_seconds_bucket", "worldloom_batch_size_count"):
        assert name in text
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert all(len(ln.rsplit(" ", 1)) == 2 and float(ln.rsplit(" ", 1)[1]) >= 0 for ln in lines)
    assert 'worldloom_requests_total{path="/v1/completions",status="200"}' in text


# ------------------------------------------------------------------------------ worlds


def test_world_session_imagines_beside_the_real_env(app):
    from worldloom.world.envs import make_adapter

    run = app.state.served["world"].run
    adapter = make_adapter(run.cfg.env.id)
    env = adapter.make()
    raw, _ = env.reset(seed=5)
    s = post(app, "/v1/worlds/world/sessions", {"seed": 5}).json()
    assert s["mission"] == adapter.mission(raw)
    assert s["real"]["observation"]["image"] == raw["image"].tolist() == s["imagined"]["observation"]["image"]
    sid = s["id"]
    step = post(app, f"/v1/worlds/world/sessions/{sid}/step", {"action": "forward"}).json()
    raw2, reward, *_ = env.step(adapter.action_names.index("forward"))
    assert step["step"] == 1 and step["action"]["name"] == "forward"
    assert step["real"]["observation"]["image"] == raw2["image"].tolist() and step["real"]["reward"] == reward
    img = step["imagined"]["observation"]["image"]
    assert len(img) == 7 and len(img[0]) == 7 and isinstance(step["imagined"]["reward"], float)
    assert step["match"] == (step["imagined"]["observation"] == step["real"]["observation"])
    for which in ("imagined", "real"):
        r = call(app, lambda c: c.get(f"/v1/worlds/world/sessions/{sid}/frame.png", params={"which": which}))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert post(app, f"/v1/worlds/world/sessions/{sid}/step", {"action": 99}).status_code == 400
    assert post(app, f"/v1/worlds/world/sessions/{sid}/step", {"action": "fly"}).status_code == 400
    assert call(app, lambda c: c.delete(f"/v1/worlds/world/sessions/{sid}")).status_code == 200
    assert post(app, f"/v1/worlds/world/sessions/{sid}/step", {"action": 0}).status_code == 404
    assert post(app, "/v1/worlds/plain/sessions", {}).status_code == 400
    assert post(app, "/v1/worlds/nope/sessions", {}).status_code == 404


def test_world_sessions_are_bounded_and_expire(app):
    sessions = app.state.served["world"].worlds
    for sid in list(sessions.table):
        sessions.delete(sid)
    ids = [post(app, "/v1/worlds/world/sessions", {"seed": i}).json()["id"] for i in range(2)]
    r = post(app, "/v1/worlds/world/sessions", {"seed": 9})
    assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_sessions"
    sessions.table[ids[0]].used -= sessions.ttl + 1  # as if unused for longer than the ttl
    assert call(app, lambda c: c.get(f"/v1/worlds/world/sessions/{ids[0]}")).status_code == 404
    assert call(app, lambda c: c.post("/v1/worlds/world/sessions")).status_code == 200  # no body: a random seed


# ------------------------------------------------------------------------------ the command line


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    from worldloom.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldloom: error:") and "run folder not found" in err and len(err.strip().splitlines()) == 1
    twin = tmp_path / "other" / "plain"
    twin.parent.mkdir()
    twin.symlink_to(runs["plain"])
    assert main(["serve", str(runs["plain"]), str(twin), "--port", "1"]) == 2
    assert "two runs are named 'plain'" in capsys.readouterr().err


def test_a_failed_step_answers_500_and_the_server_goes_on(runs, monkeypatch):
    app = create_app([runs["plain"]])
    engine = app.state.served["plain"].engine
    body = {"model": "plain", "prompt": PROMPT, "max_tokens": 4}

    def boom(*args):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(engine, "_advance", boom)
        r = post(app, "/v1/completions", body)
        assert r.status_code == 500 and r.json()["error"] == {"message": "decoding failed: boom", "type": "server_error",
                                                              "param": None, "code": None}
        chunks = post(app, "/v1/completions", {**body, "stream": True}).text
        assert '"decoding failed: boom"' in chunks and "[DONE]" not in chunks
    assert post(app, "/v1/completions", body).status_code == 200
