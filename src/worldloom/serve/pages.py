"""The web pages: a chat page and a play page, served by the same process (no build step, no CDN).

The pages are static files shipped in the package (``serve/static/``: HTML, one small plain
script per page, one stylesheet); their scripts talk to the same API as any other client
(`/v1/models`, `/v1/chat/completions` or `/v1/completions` streamed, `/v1/worlds/...`), with the
API key the user typed (kept in the browser's localStorage) as the Bearer token.

    GET /                 the chat page (static/chat.html)
    GET /play             the world runs, as links to their play pages
    GET /play/{model}     the play page of a world run (static/play.html); 404 (a plain page) otherwise
    GET /static/{file}    the pages' scripts and stylesheet
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# How the pages are looked at by a program (tests/test_pages.py, scripts/screenshots.py): Debian's
# chromium, headless, driven by playwright with the system executable (nothing is downloaded).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def add_pages(app: FastAPI, served: dict) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "chat.html", headers={"Cache-Control": "no-cache"})

    @app.get("/play", include_in_schema=False)
    async def worlds_page():
        return HTMLResponse(_worlds_page(served, "Play inside a world model"))

    @app.get("/play/{name}", include_in_schema=False)
    async def play_page(name: str):
        s = served.get(name)
        if s is None or not s.is_world:
            what = "is a text model, not a world model" if s is not None else "is not served here"
            return HTMLResponse(_worlds_page(served, f"{name!r} {what}"), status_code=404)
        return FileResponse(STATIC / "play.html", headers={"Cache-Control": "no-cache"})


def _worlds_page(served: dict, title: str) -> str:
    """A plain page: a title and a link to the play page of every world run (and to the chat page)."""
    worlds = sorted(name for name, s in served.items() if s.is_world)
    items = "".join(f'<li><a href="/play/{html.escape(n)}">{html.escape(n)}</a></li>' for n in worlds)
    listing = f"<ul>{items}</ul>" if worlds else "<p>This server has no world runs.</p>"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>worldloom: {html.escape(title)}</title>'
            f'<link rel="stylesheet" href="/static/style.css"></head><body><main><h1>{html.escape(title)}</h1>'
            f'<p>World runs on this server:</p>{listing}<p><a href="/">Chat page</a></p></main></body></html>')
