"""The talk recipe's task: the world task's episodes, plus talk segments about their views.

It is ``WorldTask`` (batches, held-out loss, model sizes, saving the stream) with two differences:
the stream's text vocabulary is learned from the missions *and* every word ``talk.text`` writes,
and the data is ``TalkData``. Training episodes whose mission names a held-out colour-object pair
(``talk.held_out``) are left out, so no training text — mission, caption or answer — names one;
their views still appear in other episodes, and every held-out episode keeps its texts.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError, DataError
from ..world.data.episodes import load_dataset
from ..world.envs import make_adapter
from ..world.stream import StreamLayout
from ..world.task import STREAM_DIR, WorldTask, dataset_dir, stream_model_sizes
from .prefix import ViewRenderer, base_config, check_prefix, prepare_prefix_model
from .stream import TalkData, TalkEpisode
from .text import check_pairs, mentions, vocabulary


def talk_episodes(layout: StreamLayout, episodes: list, hide: tuple) -> list[TalkEpisode]:
    out = []
    for e in episodes:
        tok = layout.episode(e)
        out.append(TalkEpisode(tok.prefix, tok.steps, tok.policy, images=e.obs["image"][: e.length], mission=e.mission,
                               hide=hide))
    return out


def check_talk_config(cfg: RunConfig) -> None:
    sc = cfg.stream
    if sc.obs != "tokens" or sc.parallel_obs:
        raise ConfigError("a talk run streams observations as tokens without a frame head; drop stream.obs / stream.parallel_obs")
    if not cfg.env.id.startswith(("BabyAI-", "MiniGrid-")):
        raise ConfigError(f"a talk run describes MiniGrid views; env.id={cfg.env.id} is not a MiniGrid or BabyAI level")


class TalkTask(WorldTask):
    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):  # noqa: D107 (WorldTask's, with talk data)
        check_talk_config(cfg)
        self.cfg = cfg
        ds = load_dataset(dataset_dir(cfg, run_dir))
        if ds.meta.get("env_id") != cfg.env.id:
            raise DataError(f"the episodes in {dataset_dir(cfg, run_dir)} come from {ds.meta.get('env_id')}, "
                            f"but env.id is {cfg.env.id}; set env.id={ds.meta.get('env_id')} or collect again")
        hide = check_pairs(cfg.talk.held_out)
        every = ds.episodes("train")
        train_eps = [e for e in every if not mentions(e.mission, hide)]
        val_eps = ds.episodes("val")
        self.n_demos = self.n_train = len(train_eps)
        self.n_hidden = len(every) - len(train_eps)
        self.resuming, self.freeze = resuming, None
        # a new prefix run on a base: the base's layout and model; a resumed run has both already
        self.base = base_config(cfg) if cfg.talk.view == "prefix" and not resuming else None
        if resuming or self.base is not None:
            self.layout = StreamLayout.load(Path(run_dir if resuming else cfg.prefix.base) / STREAM_DIR)
        else:
            obs = make_adapter(cfg.env.id).obs_tokenizer(ds.meta)
            texts = [e.mission for e in every] + [vocabulary()]
            self.layout = StreamLayout.build(texts, int(ds.meta["n_actions"]), cfg.stream, obs)
        lay = self.layout
        sizes = stream_model_sizes(lay, cfg.stream)
        prefix = {}
        if cfg.talk.view == "prefix":
            check_prefix(cfg.prefix, lay.obs.view)
            prefix = {"vectors": cfg.prefix.grid ** 2, "render": ViewRenderer(cfg.env.id, cfg.prefix.tile)}
        self.data = TalkData(lay, talk_episodes(lay, train_eps, hide), talk_episodes(lay, val_eps, ()), cfg.stream,
                             cfg.talk, step_skip=bool(sizes["period"]), **prefix)
        self.n_val = len(val_eps)
        self.n_train_steps = sum(e.length for e in train_eps)
        self.data.check_context(cfg.model.context)

    def model_sizes(self) -> dict:
        """The stream's sizes; with ``prefix.base``, the base run's whole model config (its weights are loaded)."""
        sizes = super().model_sizes()
        if self.base is None:
            return sizes
        return {**{f.name: getattr(self.base.model, f.name) for f in fields(self.base.model)}, **sizes}

    def prepare_model(self, model) -> None:
        """A prefix run: the base's weights, the vision prefix, the stage-1 freeze (worldloom.talk.prefix)."""
        if self.cfg.talk.view == "prefix":
            self.freeze = prepare_prefix_model(model, self.cfg, self.layout.obs.view, self.resuming)

    def before_step(self, model, step: int) -> None:
        """Stage 1 (only the vision prefix learns) for the first ``prefix.stage1_steps`` steps, then jointly."""
        if self.freeze is not None:
            self.freeze.frozen = step < self.cfg.prefix.stage1_steps

    def describe(self) -> str:
        text = (super().describe() + f"; talk segments {self.cfg.talk.fraction:.0%} of segments, held out: "
                f"{self.cfg.talk.held_out} ({self.n_hidden} training episodes naming them left out)")
        if self.cfg.talk.view == "prefix":
            pc = self.cfg.prefix
            text += (f"; views read as a vision prefix of {pc.grid ** 2} vectors, backbone frozen for {pc.stage1_steps} "
                     f"steps, from {pc.base or 'its own init'}")
        return text
