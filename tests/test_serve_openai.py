"""One real `worldloom serve` process (uvicorn on a free loopback port) driven by the official openai client:
completions, chat, streaming with the usage chunk, logprobs, n, stop, seed determinism, errors; and a
client that disconnects mid-stream frees its row."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'worldloom[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'worldloom[serve]')")
openai = pytest.importorskip("openai", reason="the official openai client is not installed (the test extra has it)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the test extra has it)")

from serve_helpers import text_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`worldloom serve plain chat` in its own process; yields its base URL."""
    root = tmp_path_factory.mktemp("served")
    runs = [text_run(root / "plain", context=512), text_run(root / "chat", chat="o")]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "worldloom", "serve", *map(str, runs), "--port", str(port),
                             "--api-key", KEY, "--max-batch", "8", "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited with status {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer /health within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_completions_n_stop_logprobs(client):
    assert {m.id for m in client.models.list()} == {"plain", "chat"}
    full = client.completions.create(model="plain", prompt="To be", max_tokens=20, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 20
    stop = text[6:8]
    cut = client.completions.create(model="plain", prompt="To be", max_tokens=20, temperature=0, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="plain", prompt="To be", max_tokens=8, n=3, seed=11, temperature=1.5,
                                     logprobs=2)
    again = client.completions.create(model="plain", prompt="To be", max_tokens=8, n=3, seed=11, temperature=1.5,
                                      logprobs=2)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    assert all(len(c.logprobs.token_logprobs) == 8 and max(c.logprobs.token_logprobs) <= 0 for c in many.choices)


def test_chat_and_streaming_with_usage(client):
    messages = [{"role": "user", "content": "2+3?"}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2)
    answer = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert all(len(t.top_logprobs) == 2 for t in whole.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == answer
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == [whole.choices[0].finish_reason]


def test_errors_through_the_client(client, server):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="plain", prompt="a", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="plain", prompt="a", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def _metric(server: str, name: str, model: str = "plain") -> float:
    text = httpx.get(server + "/metrics").text
    m = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_disconnect_frees_its_row(server):
    before = _metric(server, "worldloom_completion_tokens_total")
    body = {"model": "plain", "prompt": "To be", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token seen: hang up
    deadline = time.monotonic() + 20
    while _metric(server, "worldloom_rows_cancelled_total") < 1 or _metric(server, "worldloom_running_rows") > 0:
        assert time.monotonic() < deadline, "the row of a client that went away is still decoding"
        time.sleep(0.05)
    assert _metric(server, "worldloom_completion_tokens_total") - before < 500
