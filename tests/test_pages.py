"""The web pages (serve/pages.py, serve/static/) and the play endpoints they need.

In process (httpx's ASGI transport): the pages and their files are served (open even with an API
key), a world lists its modes and whether it has a policy, fast sessions imagine what token-by-token
sessions imagine, the agent's action is the model's own policy, imagination only leaves the real
environment alone, and bad input answers 400 (unknown action, fast mode without a frame head, the
agent on a world without a policy).

In a real browser (Debian's chromium driven by playwright, a real uvicorn server in a thread): the
chat page lists the models and streams an answer that grows and matches the library's own
decoding, Stop ends it and frees its row on the server, an API error shows as one line; the play
page shows the mission, a key press steps and loads a new imagined frame, and the agent plays.
Skipped only where chromium or playwright is missing (CI installs both).

Screenshots for the docs: ``WORLDLOOM_SCREENSHOTS=docs/img pytest tests/test_pages.py`` (tiny random
models), or scripts/screenshots.py over trained runs (what docs/img holds).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'worldloom[serve]')")
httpx = pytest.importorskip("httpx", reason="the serve extra's test client httpx is not installed")

from serve_helpers import text_run  # noqa: E402

from worldloom.serve.app import Served, Settings, create_app  # noqa: E402
from worldloom.serve.pages import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def call(app, fn):
    """Run ``await fn(client)`` against the app in process."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            return await fn(client)

    return asyncio.run(main())


def get(app, path: str, **kw):
    return call(app, lambda c: c.get(path, **kw))


def post(app, path: str, body: dict | None = None):
    return call(app, lambda c: c.post(path, json=body))


def add_bare_world(app, world_run: Path, name: str = "bare") -> None:
    """Serve the world run once more as ``name``, without its frame head and as if trained without a
    policy (stream.weight_action=0): what the 400s are about."""
    from worldloom.run import load_run
    from worldloom.serve.worlds import Sessions

    run = load_run(world_run)
    run.model.frame = None
    run.cfg.stream.weight_action = 0.0
    s = Served(name, run)
    s.worlds = Sessions(s, 4, 600.0, app.state.metrics)
    app.state.served[name] = s


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pages")
    return {"plain": text_run(root / "plain", context=1024), "chat": text_run(root / "chat", chat="o"),
            "world": world_run}


@pytest.fixture(scope="module")
def app(runs):
    app = create_app(list(runs.values()), Settings(max_sessions=8))
    add_bare_world(app, runs["world"])
    return app


# ------------------------------------------------------------------------------ pages, in process


def test_pages_and_their_files_are_served(app):
    chat = get(app, "/")
    assert chat.status_code == 200 and chat.headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in chat.text and 'id="stop"' in chat.text
    play = get(app, "/play/world")
    assert play.status_code == 200 and '<script src="/static/play.js">' in play.text
    for name, kind in (("chat.js", "javascript"), ("play.js", "javascript"), ("common.js", "javascript"),
                       ("style.css", "text/css")):
        r = get(app, f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 200, name
    assert get(app, "/static/nope.js").status_code == 404
    listing = get(app, "/play")
    assert listing.status_code == 200 and 'href="/play/world"' in listing.text and 'href="/play/plain"' not in listing.text


@pytest.mark.parametrize("name, why", [("plain", "is a text model"), ("nope", "is not served here")])
def test_play_page_of_a_non_world_is_a_404_page(app, name, why):
    r = get(app, f"/play/{name}")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert why in r.text and 'href="/play/world"' in r.text


def test_pages_stay_open_with_an_api_key(runs):
    app = create_app([runs["plain"]], Settings(api_key="k"))
    assert get(app, "/").status_code == 200 and get(app, "/static/chat.js").status_code == 200
    assert get(app, "/v1/models").status_code == 401
    assert get(app, "/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_every_static_file_is_package_data():
    """A non-editable install ships serve/static/ only through [tool.setuptools.package-data]."""
    from worldloom.serve.pages import STATIC

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["worldloom"]
    files = [p for p in STATIC.rglob("*") if p.is_file()]
    assert {"chat.html", "play.html", "chat.js", "play.js", "common.js", "style.css"} <= {p.name for p in files}
    for p in files:
        rel = p.relative_to(STATIC.parents[1]).as_posix()  # serve/static/...
        assert any(fnmatch.fnmatchcase(rel, pat) for pat in patterns), f"{rel} is not in package-data {patterns}"


# ------------------------------------------------------------------------------ play endpoints, in process


def test_worlds_list_their_modes_and_policy(app):
    worlds = {w["id"]: w for w in get(app, "/v1/worlds").json()["data"]}
    assert worlds["world"]["modes"] == ["fast", "parallel", "tokens"] and worlds["world"]["policy"] is True
    assert worlds["bare"]["modes"] == ["tokens"] and worlds["bare"]["policy"] is False
    assert post(app, "/v1/worlds/world/sessions", {"seed": 1}).json()["mode"] == "fast"  # the best by default
    assert post(app, "/v1/worlds/bare/sessions", {"seed": 1}).json()["mode"] == "tokens"


def _walk(app, world: str, mode: str, actions) -> list[dict]:
    sid = post(app, f"/v1/worlds/{world}/sessions", {"seed": 4, "mode": mode}).json()["id"]
    try:
        return [post(app, f"/v1/worlds/{world}/sessions/{sid}/step", {"action": a}).json() for a in actions]
    finally:
        call(app, lambda c: c.delete(f"/v1/worlds/{world}/sessions/{sid}"))


def test_fast_sessions_imagine_what_token_sessions_imagine(app):
    actions = ["forward", "left", "forward", "right"]
    fast, tokens = _walk(app, "world", "fast", actions), _walk(app, "world", "tokens", actions)
    assert [s["step"] for s in fast] == [1, 2, 3, 4]
    assert [s["imagined"] for s in fast] == [s["imagined"] for s in tokens]  # fast is lossless (greedy)


@pytest.mark.parametrize("mode", ["fast", "parallel"])
def test_frame_head_modes_without_a_frame_head_are_400(app, mode):
    r = post(app, "/v1/worlds/bare/sessions", {"seed": 1, "mode": mode})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "mode" and "frame head" in err["message"]
    assert post(app, "/v1/worlds/world/sessions", {"mode": "warp"}).status_code == 400


def test_the_agent_acts_with_the_models_own_policy(app, runs):
    from worldloom.world.rollout.imagine import imagined_vs_real

    run = app.state.served["world"].run
    s = post(app, "/v1/worlds/world/sessions", {"seed": 6}).json()
    assert s["policy"] is True
    step = post(app, f"/v1/worlds/world/sessions/{s['id']}/step", {"action": "agent"}).json()
    # the policy from the real stream (another code path): at the first step both streams hold the same start
    expected = imagined_vs_real(run, seed=6, steps=1, greedy=True)[1]
    assert step["action"] == {"index": expected[2], "name": expected[4], "by": "agent"}
    assert step["real"] is not None and step["step"] == 1
    mine = post(app, f"/v1/worlds/world/sessions/{s['id']}/step", {"action": "left"}).json()
    assert mine["action"]["by"] == "player" and mine["action"]["name"] == "left"


def test_bad_actions_are_400(app):
    sid = post(app, "/v1/worlds/world/sessions", {"seed": 2}).json()["id"]
    r = post(app, f"/v1/worlds/world/sessions/{sid}/step", {"action": "fly"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "action" and "'agent'" in r.json()["error"]["message"]
    assert post(app, f"/v1/worlds/world/sessions/{sid}/step", {"action": -1}).status_code == 400
    assert post(app, f"/v1/worlds/world/sessions/{sid}/step", {"action": "forward", "imagine": True}).status_code == 400
    bare = post(app, "/v1/worlds/bare/sessions", {"seed": 2}).json()
    assert bare["policy"] is False
    r = post(app, f"/v1/worlds/bare/sessions/{bare['id']}/step", {"action": "agent"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_policy" and "weight_action=0" in r.json()["error"]["message"]
    assert post(app, f"/v1/worlds/bare/sessions/{bare['id']}/step", {"action": "forward"}).status_code == 200


def test_imagination_only_leaves_the_real_env_for_good(app):
    s = post(app, "/v1/worlds/world/sessions", {"seed": 3}).json()
    path = f"/v1/worlds/world/sessions/{s['id']}"
    first = post(app, path + "/step", {"action": "forward"}).json()
    assert first["real"] is not None and first["imagination_only"] is False
    real_png = get(app, path + "/frame.png", params={"which": "real"}).content
    off = post(app, path + "/step", {"action": "left", "imagination_only": True}).json()
    assert off["real"] is None and off["match"] is False and off["imagination_only"] is True and off["step"] == 2
    again = post(app, path + "/step", {"action": "forward"}).json()  # it stays on: the worlds have parted
    assert again["real"] is None and again["imagination_only"] is True
    shown = get(app, path).json()
    assert shown["imagination_only"] is True and shown["step"] == 3
    assert shown["real"]["observation"] == first["real"]["observation"]  # the real env did not move
    assert get(app, path + "/frame.png", params={"which": "real"}).content == real_png
    new = post(app, "/v1/worlds/world/sessions", {"seed": 3, "imagination_only": True}).json()
    assert new["imagination_only"] is True
    assert post(app, f"/v1/worlds/world/sessions/{new['id']}/step", {"action": "forward"}).json()["real"] is None


# ------------------------------------------------------------------------------ in a real browser

PROMPT = "To be, or not"
SHOTS = os.environ.get("WORLDLOOM_SCREENSHOTS")  # a folder: save the pages' screenshots there


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra has it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(runs, browser):
    """The runs behind a real uvicorn server (a thread of this process); the plain model decodes one step
    every 20 ms, so a stream lasts long enough to be watched growing and stopped."""
    from worldloom.serve import in_thread

    app = create_app(list(runs.values()), Settings(max_sessions=8))
    engine = app.state.served["plain"].engine
    advance = engine._advance

    def paced(*args):
        time.sleep(0.02)
        return advance(*args)

    engine._advance = paced
    with in_thread(app) as url:
        yield app, url


@pytest.fixture
def page(browser, site):
    """A fresh page; a script error on it fails the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def expect(x):
    from playwright.sync_api import expect

    return expect(x)


def wait_for(check, what: str, timeout: float = 30.0):
    """Poll ``check()`` until it is truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return got


def metric(url: str, name: str, model: str = "plain") -> float:
    m = re.search(rf'^{name}{{model="{model}"}} (\S+)$', httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def ask(page, model: str, prompt: str, max_tokens: int, temperature: float):
    page.select_option("#model", model)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    return page.locator(".msg.assistant").last


def test_chat_page_lists_the_models_and_streams_the_answer(page, site):
    from worldloom.decode import SamplingConfig, generate

    app, url = site
    page.goto(url + "/")
    expect(page.locator("#model option")).to_have_count(2)
    assert sorted(page.locator("#model option").all_inner_texts()) == ["chat (chat)", "plain (completions)"]
    expect(page.locator("#worlds a")).to_have_text(["Play world"])
    page.select_option("#model", "chat")
    expect(page.locator("#endpoint")).to_contain_text("/v1/chat/completions")
    answer = ask(page, "plain", PROMPT, 24, 0)
    expect(page.locator("#endpoint")).to_contain_text("/v1/completions")
    lengths = []
    while not page.locator("#status").inner_text().startswith("done"):
        lengths.append(len(answer.text_content()))
        assert len(lengths) < 5000, "the answer never finished"
    text = answer.text_content()
    assert len({n for n in lengths if 0 < n < len(text)}) >= 2, f"the answer did not grow piece by piece: {lengths}"
    run = app.state.served["plain"].run
    assert text == generate(run.model, run.tokenizer, [PROMPT], SamplingConfig(max_new_tokens=24, temperature=0))[0]
    expect(page.locator("#status")).to_have_text("done (finish_reason: length)")
    expect(page.locator(".msg.user").last).to_have_text(PROMPT)
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "chat-page.png"))


def test_stop_ends_the_stream_and_frees_its_row(page, site):
    app, url = site
    cancelled, tokens = metric(url, "worldloom_rows_cancelled_total"), metric(url, "worldloom_completion_tokens_total")
    page.goto(url + "/")
    expect(page.locator("#model option")).to_have_count(2)
    answer = ask(page, "plain", PROMPT, 900, 1.0)
    expect(page.locator("#stop")).to_be_enabled()
    first = wait_for(lambda: len(answer.text_content()), "the first text")
    wait_for(lambda: len(answer.text_content()) > first, "the answer to grow")
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    shown = answer.text_content()
    time.sleep(0.3)
    assert answer.text_content() == shown  # nothing more arrives
    wait_for(lambda: metric(url, "worldloom_rows_cancelled_total") > cancelled
             and metric(url, "worldloom_running_rows") == 0, "the server to drop the row of the stopped answer")
    assert metric(url, "worldloom_completion_tokens_total") - tokens < 900


def test_an_api_error_shows_as_one_line(page, site):
    app, url = site
    page.goto(url + "/")
    expect(page.locator("#model option")).to_have_count(2)
    ask(page, "plain", PROMPT, 5000, 0)  # more than the context
    expect(page.locator("#error")).to_be_visible()
    line = page.locator("#error").inner_text()
    assert line.startswith("400: max_tokens 5000") and "\n" not in line
    expect(page.locator("#status")).to_have_text("failed")
    expect(page.locator("#send")).to_be_enabled()


def png(page, selector: str) -> bytes:
    """The bytes of the picture an <img> shows (its blob: URL read back in the page)."""
    data = page.evaluate("async (sel) => Array.from(new Uint8Array(await (await fetch("
                         "document.querySelector(sel).src)).arrayBuffer()))", selector)
    return bytes(data)


def test_play_page_keys_step_the_imagined_world(page, site):
    from worldloom.world.envs import make_adapter

    app, url = site
    adapter = make_adapter(app.state.served["world"].run.cfg.env.id)
    env = adapter.make()
    mission = adapter.mission(env.reset(seed=7)[0])
    env.close()
    page.goto(url + "/play/world")
    expect(page.locator("#status")).to_contain_text("mode fast")  # a session starts by itself, in the best mode
    expect(page.locator("#mode")).to_have_value("fast")
    page.fill("#seed", "7")
    page.click("#new-session")
    expect(page.locator("#status")).to_contain_text("seed 7, mode fast")
    expect(page.locator("#mission")).to_have_text(mission)
    imagined = page.locator("#imagined")
    expect(imagined).to_have_attribute("data-step", "0")
    expect(page.locator("#real")).to_have_attribute("data-step", "0")
    src, before = imagined.get_attribute("src"), png(page, "#imagined")
    page.keyboard.press("ArrowUp")
    expect(imagined).to_have_attribute("data-step", "1")
    expect(page.locator("#step")).to_have_text("1")
    expect(page.locator("#last-action")).to_have_text("forward (player)")
    expect(page.locator("#real")).to_have_attribute("data-step", "1")
    after = png(page, "#imagined")
    assert imagined.get_attribute("src") != src and after != before
    sid = page.evaluate("session.id")
    assert after == httpx.get(f"{url}/v1/worlds/world/sessions/{sid}/frame.png").content
    page.click("button[aria-label='Action: left']")
    expect(page.locator("#last-action")).to_have_text("left (player)")
    expect(imagined).to_have_attribute("data-step", "2")
    page.keyboard.press(" ")  # after a click on a button, Space is still the toggle key (not that button again)
    expect(page.locator("#last-action")).to_have_text("toggle (player)")
    expect(imagined).to_have_attribute("data-step", "3")


def test_the_agent_plays_and_imagination_only_hides_the_real_world(page, site):
    app, url = site
    page.goto(url + "/play/world")
    expect(page.locator("#imagined")).to_have_attribute("data-step", "0")
    page.click("#agent")
    wait_for(lambda: int(page.locator("#step").inner_text()) >= 3
             or "ended the imagined episode" in page.locator("#status").inner_text(), "the agent to take steps")
    if page.locator("#agent").get_attribute("aria-pressed") == "true":
        page.click("#agent")  # stop it
    expect(page.locator("#agent")).to_have_text("Let the agent play")
    expect(page.locator("#last-action")).to_contain_text("(agent)")
    page.wait_for_timeout(300)  # a step already on its way ends
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "play-page.png"))
    steps = int(page.locator("#step").inner_text())
    page.check("#imagine-only")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#step")).to_have_text(str(steps + 1))
    expect(page.locator("#real-figure")).to_be_hidden()
    expect(page.locator("#real-off")).to_be_visible()
    expect(page.locator("#imagined")).to_have_attribute("data-step", str(steps + 1))


def test_play_page_of_an_unknown_world_says_so(page, site):
    app, url = site
    response = page.goto(url + "/play/nope")
    assert response.status == 404
    expect(page.locator("h1")).to_contain_text("'nope' is not served here")
    expect(page.locator("a[href='/play/world']")).to_have_text("world")


def test_the_api_key_typed_once_serves_both_pages(browser, runs):
    """With --api-key, the pages ask for the key (401 in the error line), keep it in localStorage and send
    it with every call, frames included."""
    from worldloom.serve import in_thread

    app = create_app([runs["plain"], runs["world"]], Settings(api_key="sesame"))
    context = browser.new_context()
    page = context.new_page()
    try:
        with in_thread(app) as url:
            page.goto(url + "/")
            expect(page.locator("#error")).to_contain_text("401: no API key was given")
            expect(page.locator("#model option")).to_have_count(0)
            page.fill("#api-key", "sesame")
            page.press("#api-key", "Tab")  # a change event: saved, the models loaded again
            expect(page.locator("#model option")).to_have_count(1)
            expect(page.locator("#error")).to_be_hidden()
            page.goto(url + "/play/world")
            expect(page.locator("#imagined")).to_have_attribute("data-step", "0")
            expect(page.locator("#api-key")).to_have_value("sesame")
            page.keyboard.press("ArrowUp")
            expect(page.locator("#imagined")).to_have_attribute("data-step", "1")
            expect(page.locator("#error")).to_be_hidden()
    finally:
        context.close()
