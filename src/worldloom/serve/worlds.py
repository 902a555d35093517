"""World endpoints: play inside a served world model, with the real environment beside it.

A session starts from a seed: the REAL environment is reset with it, and its first observation and
mission start an imagined stream (`BatchedWorldModelEnv`, one row). Each step takes an action; the
model imagines the reward, the end and the next observation, and the real environment takes the
same action, so the answer holds both (and whether they agree). Frames are PNG pictures drawn by
the environment adapter. Sessions expire after ``ttl`` seconds unused and are bounded in number
(a full table answers 503); the model work of a world runs in one worker thread.

The action ``"agent"`` lets the model choose: the world model is also the policy, and it acts on
what it imagines (`BatchedWorldModelEnv.policy_actions`); a run trained without a policy
(``stream.weight_action=0``) refuses it. ``imagination_only`` leaves the real environment where
it is from that step on (the answer's ``real`` is then null and ``imagination_only`` true): the
two worlds cannot be compared again, so it stays on for the rest of the session.

    GET    /v1/worlds                                   the world runs served (their modes, actions, policy)
    POST   /v1/worlds/{model}/sessions                  {"seed": 3, "mode": "fast"|"parallel"|"tokens", "greedy": true,
                                                         "imagination_only": false}
    GET    /v1/worlds/{model}/sessions/{id}             the session as it stands
    POST   /v1/worlds/{model}/sessions/{id}/step        {"action": 2 | "forward" | "agent", "imagination_only": false}
    GET    /v1/worlds/{model}/sessions/{id}/frame.png   ?which=imagined|real&tile=16
    DELETE /v1/worlds/{model}/sessions/{id}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import random
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import Query, Response
from pydantic import Field

from .protocol import APIError, _Body


AGENT = "agent"  # the action that asks the model's own policy


class SessionRequest(_Body):
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    mode: Literal["tokens", "parallel", "fast"] | None = None  # None: the best the run has (available_modes)
    greedy: bool = True
    imagination_only: bool = False


class StepRequest(_Body):
    action: int | str
    imagination_only: bool = False


def has_policy(run) -> bool:
    """Whether a world run was trained to choose actions (stream.weight_action > 0)."""
    return run.cfg.stream.weight_action > 0


def _obs(fields: dict) -> dict:
    return {k: np.asarray(v).tolist() for k, v in fields.items()}


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


class Session:
    """One imagined episode and its real twin (see the module doc)."""

    def __init__(self, served, seed: int, mode: str | None, greedy: bool, imagination_only: bool = False):
        from ..world.envs import make_adapter
        from ..world.rollout.imagine import BatchedWorldModelEnv, available_modes

        run = served.run
        self.id, self.seed, self.t = uuid.uuid4().hex[:16], seed, 0
        self.adapter = make_adapter(run.cfg.env.id)
        self.policy, self.imagination_only = has_policy(run), bool(imagination_only)
        mode = mode or available_modes(run.model)[0]
        try:
            self.sim = BatchedWorldModelEnv(run.model, run.layout, mode, greedy, seed=seed)
        except ValueError as e:
            raise APIError(400, str(e), param="mode") from None
        self.mode = self.sim.mode
        self.real = self.adapter.make()
        raw, _ = self.real.reset(seed=seed)
        self.mission = self.adapter.mission(raw)
        self.sim.max_steps = self.adapter.max_steps(self.real)
        first = self.adapter.observe(raw)
        self.sim.reset([self.mission], {k: v[None] for k, v in first.items()})
        self.imagined, self.real_obs = dict(first), dict(first)
        self.imagined_done = self.real_done = False
        self.used = time.monotonic()

    def action_index(self, action) -> int:
        """An action's index, by number or name (``"agent"``: -1, the policy chooses at the step)."""
        names = self.adapter.action_names
        if action == AGENT:
            if not self.policy:
                raise APIError(400, "this world run was trained without a policy (stream.weight_action=0): the agent "
                                    "cannot choose; give an action", param="action", code="no_policy")
            return -1
        if isinstance(action, str):
            if action not in names:
                raise APIError(400, f"unknown action {action!r}; actions: {', '.join(names)} (or {AGENT!r})",
                               param="action")
            return names.index(action)
        if not 0 <= action < len(names):
            raise APIError(400, f"action {action} is out of range; actions are 0..{len(names) - 1} ({', '.join(names)})",
                           param="action")
        return int(action)

    def step(self, a: int, imagination_only: bool = False) -> dict:
        """Imagine one step (``a`` -1: the policy's action) and take it in the real environment (until
        the real episode ended, or for good once ``imagination_only``)."""
        by = "agent" if a < 0 else "player"
        if a < 0:
            a = int(self.sim.policy_actions()[0])
        self.imagination_only |= bool(imagination_only)
        obs, reward, term, trunc = self.sim.step(np.array([a]))
        self.imagined = {k: v[0] for k, v in obs.items()}
        self.imagined_done = bool(term[0] or trunc[0])
        imagined = {"observation": _obs(self.imagined), "reward": float(reward[0]), "terminated": bool(term[0]),
                    "truncated": bool(trunc[0])}
        real = None
        if not self.real_done and not self.imagination_only:
            raw, r, rterm, rtrunc, _ = self.real.step(a)
            self.real_obs = self.adapter.observe(raw)
            self.real_done = bool(rterm or rtrunc)
            real = {"observation": _obs(self.real_obs), "reward": float(r), "terminated": bool(rterm),
                    "truncated": bool(rtrunc)}
        self.t += 1
        return {"id": self.id, "step": self.t, "action": {"index": a, "name": self.adapter.action_names[a], "by": by},
                "imagined": imagined, "real": real, "match": real is not None and _same(self.imagined, self.real_obs),
                "imagination_only": self.imagination_only}

    def describe(self) -> dict:
        return {"id": self.id, "object": "world.session", "seed": self.seed, "mission": self.mission, "step": self.t,
                "mode": self.mode, "actions": list(self.adapter.action_names), "policy": self.policy,
                "imagination_only": self.imagination_only,
                "imagined": {"observation": _obs(self.imagined), "done": self.imagined_done},
                "real": {"observation": _obs(self.real_obs), "done": self.real_done}}

    def frame(self, which: str, tile: int) -> bytes:
        from PIL import Image

        rgb = self.adapter.render(self.imagined if which == "imagined" else self.real_obs, tile)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def close(self) -> None:
        self.real.close()


class Sessions:
    """The sessions of one world run: bounded, expiring, stepped in one worker thread."""

    def __init__(self, served, max_sessions: int = 32, ttl: float = 600.0, metrics=None):
        self.served, self.max_sessions, self.ttl, self.metrics = served, max_sessions, ttl, metrics
        self.table: dict[str, Session] = {}
        from ..world.envs import make_adapter

        self.actions = list(make_adapter(served.run.cfg.env.id).action_names)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"world-{served.name}")

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self.table.items() if now - s.used > self.ttl]:
            self.table.pop(sid).close()
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.sessions.set(len(self.table), model=self.served.name)

    async def open(self, req: SessionRequest) -> Session:
        self.expire()
        if len(self.table) >= self.max_sessions:
            raise APIError(503, f"world {self.served.name!r} has {self.max_sessions} open sessions, its limit; "
                                "delete one or wait for one to expire", type="server_error", code="too_many_sessions")
        seed = req.seed if req.seed is not None else random.randrange(2**31 - 1)
        session = await self.run(Session, self.served, seed, req.mode, req.greedy, req.imagination_only)
        self.table[session.id] = session
        self._gauge()
        return session

    def get(self, sid: str) -> Session:
        self.expire()
        if sid not in self.table:
            raise APIError(404, f"no session {sid!r} in world {self.served.name!r} (it may have expired)",
                           param="session", code="session_not_found")
        s = self.table[sid]
        s.used = time.monotonic()
        return s

    def delete(self, sid: str) -> None:
        self.get(sid)
        self.table.pop(sid).close()
        self._gauge()


def add_world_routes(app, served: dict) -> None:
    from ..world.rollout.imagine import available_modes
    from .app import find

    def world(name: str) -> Sessions:
        s = find(served, name)
        if not s.is_world:
            raise APIError(400, f"{name!r} is a text model, not a world model; use /v1/completions", param="model",
                           code="wrong_model_kind")
        return s.worlds

    @app.get("/v1/worlds")
    async def worlds():
        return {"object": "list", "data": [
            {"id": s.name, "object": "world", "env_id": s.run.cfg.env.id,
             "actions": s.worlds.actions, "modes": available_modes(s.run.model), "policy": has_policy(s.run),
             "sessions": len(s.worlds.table), "max_sessions": s.worlds.max_sessions}
            for s in served.values() if s.is_world]}

    @app.post("/v1/worlds/{name}/sessions")
    async def open_session(name: str, body: SessionRequest | None = None):
        return (await world(name).open(body or SessionRequest())).describe()

    @app.get("/v1/worlds/{name}/sessions/{sid}")
    async def show(name: str, sid: str):
        return world(name).get(sid).describe()

    @app.post("/v1/worlds/{name}/sessions/{sid}/step")
    async def step(name: str, sid: str, body: StepRequest):
        w = world(name)
        s = w.get(sid)
        return await w.run(s.step, s.action_index(body.action), body.imagination_only)

    @app.get("/v1/worlds/{name}/sessions/{sid}/frame.png")
    async def frame(name: str, sid: str, which: Literal["imagined", "real"] = "imagined",
                    tile: int = Query(16, ge=4, le=64)):
        w = world(name)
        png = await w.run(w.get(sid).frame, which, tile)
        return Response(png, media_type="image/png")

    @app.delete("/v1/worlds/{name}/sessions/{sid}")
    async def close(name: str, sid: str):
        world(name).delete(sid)
        return {"id": sid, "object": "world.session", "deleted": True}

