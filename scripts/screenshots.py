#!/usr/bin/env python
"""Screenshots of the web pages for the docs (docs/img/chat-page.png, docs/img/play-page.png).

    python scripts/screenshots.py runs/chat runs/babyai [--out docs/img] [--prompts "reverse: loom" ...] [--seed 3]

Serves the runs (a real uvicorn server in a thread), opens the pages in headless chromium
(playwright with the system browser, as tests/test_pages.py) and saves: the chat page after
streamed answers of the first text run (a chat run preferred), and the play page of the first
world run after a few key presses and a few steps of the agent. Docs, taken once by hand: the
tests do not rewrite them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chat_shot(page, url: str, model: str, prompts: list[str], out: Path) -> None:
    page.goto(url + "/")
    page.wait_for_selector(f"#model option[value='{model}']", state="attached")
    page.select_option("#model", model)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "60")
    for prompt in prompts:
        page.fill("#prompt", prompt)
        page.press("#prompt", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=120_000)
    page.screenshot(path=str(out))


def play_shot(page, url: str, world: str, seed: int, agent_steps: int, out: Path) -> None:
    page.goto(url + f"/play/{world}")
    page.wait_for_selector("#imagined[data-step='0']")
    page.fill("#seed", str(seed))
    page.click("#new-session")
    page.wait_for_function("document.getElementById('status').textContent.includes('seed')")
    page.wait_for_selector("#imagined[data-step='0']")
    for n, key in enumerate(["ArrowUp", "ArrowLeft"], 1):
        page.keyboard.press(key)
        page.wait_for_selector(f"#imagined[data-step='{n}']")
    if not page.locator("#agent").is_disabled():
        for n in range(3, 3 + agent_steps):
            page.click("#agent-step")
            page.wait_for_selector(f"#imagined[data-step='{n}']", timeout=60_000)
    page.screenshot(path=str(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders to serve (at least one text run and one world run)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--prompts", nargs="+", default=["reverse: loom", "sort: dbca"], help="asked in turn")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--agent-steps", type=int, default=3)
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from worldloom.errors import WorldloomError
    from worldloom.serve import in_thread
    from worldloom.serve.app import create_app
    from worldloom.serve.pages import CHROMIUM, CHROMIUM_ARGS

    try:
        app = create_app(args.runs)
    except WorldloomError as e:
        print(f"screenshots: error: {e}", file=sys.stderr)
        return 2
    served = app.state.served
    texts = sorted((not s.run.cfg.tune.base, name) for name, s in served.items() if not s.is_world)  # chat runs first
    worlds = [name for name, s in served.items() if s.is_world]
    if not texts or not worlds:
        print("screenshots: error: give at least one text run and one world run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 720})
        chat_shot(page, url, texts[0][1], args.prompts, out / "chat-page.png")
        play_shot(page, url, worlds[0], args.seed, args.agent_steps, out / "play-page.png")
        browser.close()
    print(f"wrote {out / 'chat-page.png'} and {out / 'play-page.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
