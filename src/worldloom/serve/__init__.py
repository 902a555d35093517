"""`worldloom serve`: an OpenAI-compatible server for text runs and play endpoints for world runs.

    worldloom serve runs/chat runs/babyai --port 8000 [--api-key KEY] [--max-batch 16] [--max-queue 64]

Modules: `app` (the FastAPI application: routes, the API key, errors, /health, /metrics),
`completions` (/v1/completions, /v1/chat/completions, SSE), `engine` (continuous batching: one decode
loop per text model), `rows` (joining and compacting cache rows; a row's text, stop strings and
UTF-8 come from `worldloom.inference.textstream`), `worlds` (/v1/worlds sessions), `pages` (the chat and play pages, `static/`), `protocol` (request bodies, OpenAI's error shape), `metrics`
(Prometheus text). FastAPI and uvicorn come with the optional extra: ``pip install 'worldloom[serve]'``.
docs/serving.md has the whole story.
"""

from __future__ import annotations

import contextlib
import threading
import time

from ..errors import WorldloomError


def check_installed() -> None:
    """WorldloomError (one line) unless the serve extra (fastapi, uvicorn) is installed."""
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise WorldloomError(f"`worldloom serve` needs {' and '.join(missing)}: pip install 'worldloom[serve]'")


def serve(runs, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 64, max_sessions: int = 32, session_ttl: float = 600.0, log_level: str = "info") -> None:
    """Load the runs and serve them until interrupted."""
    check_installed()
    import uvicorn

    from .app import Settings, create_app

    settings = Settings(api_key or None, max_batch, max_queue, max_sessions, session_ttl)
    app = create_app(list(runs), settings)
    where = f"http://{host}:{port}"
    worlds = [f"{where}/play/{name}" for name, s in app.state.served.items() if s.is_world]
    print(f"pages: chat {where}/" + (f", play {', '.join(worlds)}" if worlds else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Serve ``app`` with uvicorn from a background thread (tests, scripts); yields its base URL
    (``port=0``: a free port) and stops the server on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="worldloom-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise WorldloomError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
