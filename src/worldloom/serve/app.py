"""The ASGI application: served runs, routes, the API key, errors in OpenAI's shape, /health, /metrics.

``create_app(runs, ...)`` serves any mix of run folders in one process: text runs through
`/v1/completions` and `/v1/chat/completions` (each with its own `engine.Engine`), world runs
through `/v1/worlds` (`worlds.py`). Every run is listed by `/v1/models` under its folder's name;
the web pages (`pages.py`: `/` chat, `/play/{model}`) are served beside the API.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError
from . import completions
from .engine import Engine
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, error_body, validation_error


@dataclass
class Served:
    """One run being served: text runs get an engine, world runs a session table."""

    name: str
    run: object  # LoadedRun
    engine: Engine | None = None
    worlds: object = None  # worlds.Sessions
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def is_world(self) -> bool:
        return self.run.is_world

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def context(self) -> int:
        return self.run.cfg.model.context


@dataclass
class Settings:
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_sessions: int = 32
    session_ttl: float = 600.0


def load_served(paths, settings: Settings, metrics: Metrics) -> dict[str, Served]:
    """Every run folder loaded, named by its folder; ConfigError on a repeated name or a fill-mask run."""
    from ..run import load_run
    from .worlds import Sessions

    served: dict[str, Served] = {}
    for path in paths:
        run = load_run(Path(path))
        name = Path(path).resolve().name
        if name in served:
            raise ConfigError(f"two runs are named {name!r}; serve runs from folders with different names")
        s = Served(name, run)
        if run.is_world:
            s.worlds = Sessions(s, settings.max_sessions, settings.session_ttl, metrics)
        elif run.cfg.train.objective == "masked":
            raise ConfigError(f"{path} was trained with train.objective=masked (fill-mask only); it cannot complete text")
        else:
            s.engine = Engine(name, run.model, run.tokenizer, settings.max_batch, settings.max_queue, metrics)
        served[name] = s
    return served


def create_app(runs, settings: Settings | None = None) -> FastAPI:
    """The app over run folders (paths) or already built `Served` entries (tests)."""
    settings = settings or Settings()
    metrics = Metrics()
    served = runs if isinstance(runs, dict) else load_served(runs, settings, metrics)

    async def lifespan(app):
        yield
        for s in served.values():
            if s.engine is not None:
                await s.engine.close()

    app = FastAPI(title="worldloom", lifespan=lifespan)
    app.state.served, app.state.metrics, app.state.settings = served, metrics, settings
    _add_errors(app)
    _add_middleware(app, settings, metrics)
    _add_text_routes(app, served)
    from .pages import add_pages
    from .worlds import add_world_routes

    add_world_routes(app, served)
    add_pages(app, served)
    return app


def find(served: dict, name: str) -> Served:
    if name not in served:
        raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(sorted(served)) or 'none'}",
                       param="model", code="model_not_found")
    return served[name]


def _text_model(served: dict, name: str) -> Served:
    s = find(served, name)
    if s.is_world:
        raise APIError(400, f"{name!r} is a world model; use /v1/worlds/{name}/sessions", param="model",
                       code="wrong_model_kind")
    return s


def _add_text_routes(app: FastAPI, served: dict) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": sorted(served)}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(app.state.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(s) for s in served.values()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        return _model_card(find(served, name))

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        return _reply(await completions.completions(_text_model(served, body.model), body, request))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return _reply(await completions.chat(_text_model(served, body.model), body, request))


def _model_card(s: Served) -> dict:
    cfg = s.run.cfg
    return {"id": s.name, "object": "model", "created": s.created, "owned_by": "worldloom",
            "kind": "world" if s.is_world else "text", "context": cfg.model.context, "backbone": cfg.model.backbone,
            "chat": bool(not s.is_world and cfg.tune.base)}


def _reply(out):
    if isinstance(out, dict):
        return out
    return StreamingResponse(out, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", code=kind),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        logging.getLogger("worldloom.serve").error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"), status_code=500)


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    app.add_middleware(Guard, key=settings.api_key, metrics=metrics)


class Guard:
    """Plain ASGI middleware (streams and disconnects pass through untouched): the API key on /v1
    (401 in OpenAI's shape when it is missing or wrong) and the request counter by route and status."""

    def __init__(self, app, key: str | None, metrics: Metrics):
        self.app, self.key, self.metrics = app, key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                what = "no API key was given" if not token else "the API key is wrong"
                self.metrics.requests.inc(path="unauthorized", status=401)
                response = JSONResponse(error_body(f"{what} (send the header 'Authorization: Bearer KEY')",
                                                   code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send)
        status = {}

        async def record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            self.metrics.requests.inc(path=getattr(route, "path", "unmatched"), status=status.get("code", 0))
