"""The world recipe's task for the training loop: collected episodes -> stream -> batches.

The dataset comes from ``data.path`` (a folder written by `worldloom collect`) or, when that
is empty, from ``<run>/data`` (where `worldloom train` collects it). The stream layout (mission
vocabulary, codebook, offsets) is built from the training episodes once and saved in
``<run>/stream/``; the model's vocabulary, slot count and frame head follow from it. Episodes
the run collected on-policy (``<run>/onpolicy``, worldloom.world.data.onpolicy) join the training set.

With ``stream.spoken`` > 0 the layout also holds an audio tokenizer (``audio.tokenizer``, else the
run's own ``<run>/audio-tokenizer`` stage, which the pipeline trains first; saved in ``stream/``), and
that share of the episodes, chosen by their seeds, hear their mission in a training voice drawn
from the seed (worldloom.audio.spoken): espeak-ng speaks each one when the task is built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import DataError
from ..evaluate import sampled_loss
from ..losses import world_stream_loss
from ..modality import step_positions
from .data.packing import EpisodeData
from .envs import make_adapter
from .data.episodes import META_FILE, load_dataset
from .data.onpolicy import ONPOLICY_DIR
from .stream import StreamLayout

STREAM_DIR = "stream"
DATA_DIR = "data"
AUDIO_DIR = "audio-tokenizer"  # a spoken run's own audio-tokenizer stage (when audio.tokenizer is empty)


def dataset_dir(cfg: RunConfig, run_dir: Path) -> Path:
    return Path(cfg.data.path) if cfg.data.path else Path(run_dir) / DATA_DIR


def stream_model_sizes(lay: StreamLayout, sc) -> dict:
    """The ModelConfig fields a stream layout and the run's ``stream`` config fix (vocabulary, slots, step
    skip, frame head or encoded observations)."""
    grid = getattr(lay.obs, "view", 0)  # a grid view's cells are a step's first slots
    encoded = sc.obs == "encoded"
    for key in ("names", "match"):
        if getattr(sc, key) and lay.obs.kind != "grid":
            raise DataError(f"stream.{key} ties mission words to the object and colour of grid cells; the {lay.obs.kind} "
                            f"tokenizer has none (today: MiniGrid and BabyAI symbolic views); drop stream.{key}")
    if encoded and not grid:
        raise DataError(f"stream.obs=encoded reads observations as a grid of cells; the {lay.obs.kind} tokenizer has none")
    return {"vocab_size": lay.vocab_size, "slots": lay.n_slots,
            "frame_tokens": lay.obs_len if sc.parallel_obs else 0,
            "period": lay.step_len if sc.step_skip and not encoded else 0,
            "slot_grid": grid if sc.grid_pos else 0,
            "obs_vectors": sc.obs_vectors if encoded else 0, "obs_len": lay.obs_len if encoded else 0,
            "obs_grid": grid if encoded else 0, "obs_film": bool(sc.obs_film and encoded),
            "mission_vec": sc.mission_vec, "mission_encoder": sc.mission_encoder,
            "name_attrs": lay.obs.n_objects + lay.obs.n_colors if (sc.names or sc.match) and grid else 0,
            "name_vectors": bool(sc.names), "mission_match": bool(sc.match)}


def observation_tokenizer(cfg: RunConfig, run_dir: Path, meta: dict):
    """A new run's observation tokenizer: the one the environment declares (MiniGrid's cells), or for pixel
    environments the image tokenizer the run streams its frames through (worldloom.vision.stage)."""
    from ..vision.stage import has_pixels, image_tokenizer_for

    if has_pixels(cfg.env.id):
        return image_tokenizer_for(cfg, run_dir)
    return make_adapter(cfg.env.id).obs_tokenizer(meta)


def place_rule_for(cfg: RunConfig, obs) -> str:
    """The place rule a new run's layout follows: the environment's when stream.places is on, else ""."""
    if not cfg.stream.places:
        return ""
    rule = make_adapter(cfg.env.id).place_rule
    if not rule or obs.kind != "grid":
        raise DataError(f"stream.places follows an environment's place rule, and {cfg.env.id} streamed through the "
                        f"{obs.kind} tokenizer has none (today: MiniGrid and BabyAI symbolic views); drop stream.places")
    return rule


def audio_tokenizer_for(cfg: RunConfig, run_dir: Path):
    """A new run's audio tokenizer when its missions are spoken (``stream.spoken`` > 0), else None."""
    if not cfg.stream.spoken:
        return None
    from ..audio.tokenizer import AudioTokenizer
    from ..recipes.listen import tokenizer_dir

    where = tokenizer_dir(cfg, run_dir, AUDIO_DIR)
    if not where.is_dir():
        raise DataError(f"stream.spoken={cfg.stream.spoken:g} hears missions through an audio tokenizer, and {where} holds "
                        "none; give audio.tokenizer=RUN (a `worldloom train tokenizer-audio` run) or let `worldloom train` "
                        "train one first")
    return AudioTokenizer.from_run(where)


def mission_voices(layout: StreamLayout, episodes: list, share: float) -> list:
    """The voice each episode hears its mission in (worldloom.audio.spoken), None where it reads the words."""
    if layout.audio is None or share <= 0:
        return [None] * len(episodes)
    from ..audio.spoken import is_spoken, voice_for

    held = layout.audio.cfg.held_out()  # the tokenizer's held-out voices: never heard by it nor by this run
    return [voice_for(e.seed, held) if is_spoken(e.seed, share) else None for e in episodes]


class WorldTask:
    """Episodes as a training task (``worldloom.train.task.Task``): packed stream rows, the world-stream objective."""

    objective = staticmethod(world_stream_loss)
    n_spoken = 0  # training episodes that hear their mission (stream.spoken)

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        self.cfg = cfg
        ds = load_dataset(dataset_dir(cfg, run_dir))
        if ds.meta.get("env_id") != cfg.env.id:
            raise DataError(f"the episodes in {dataset_dir(cfg, run_dir)} come from {ds.meta.get('env_id')}, "
                            f"but env.id is {cfg.env.id}; set env.id={ds.meta.get('env_id')} or collect again")
        train_eps, val_eps = ds.episodes("train"), ds.episodes("val")
        self.n_demos = len(train_eps)
        onpolicy = Path(run_dir) / ONPOLICY_DIR
        if (onpolicy / META_FILE).is_file():
            train_eps += load_dataset(onpolicy).episodes("train")
        if resuming:
            self.layout = StreamLayout.load(Path(run_dir) / STREAM_DIR)
        else:
            obs = observation_tokenizer(cfg, run_dir, ds.meta)
            self.layout = StreamLayout.build([e.mission for e in train_eps], int(ds.meta["n_actions"]), cfg.stream, obs,
                                             audio_tokenizer_for(cfg, Path(run_dir)), place_rule_for(cfg, obs))
        lay = self.layout
        sizes = stream_model_sizes(lay, cfg.stream)  # the model's stream inputs decide the batches' shape
        voices = {s: mission_voices(lay, eps, cfg.stream.spoken) for s, eps in (("train", train_eps), ("val", val_eps))}
        self.n_spoken = sum(v is not None for v in voices["train"])
        self.data = EpisodeData(lay, [lay.episode(e, v) for e, v in zip(train_eps, voices["train"])],
                                [lay.episode(e, v) for e, v in zip(val_eps, voices["val"])], cfg.stream,
                                frame_head=bool(sizes["frame_tokens"]), step_skip=bool(sizes["period"]),
                                step_cost=step_positions(lay.step_len, sizes["obs_len"], sizes["obs_vectors"]))
        self.n_train, self.n_val = len(train_eps), len(val_eps)
        self.n_train_steps = sum(e.length for e in train_eps)
        self.data.check_context(cfg.model.context)

    def model_sizes(self) -> dict:
        return stream_model_sizes(self.layout, self.cfg.stream)

    def prepare_model(self, model) -> None:
        """stream.names, stream.match: which ids show or name which attribute (a resumed run's checkpoint holds the same)."""
        if getattr(model, "id_attrs", None) is not None:
            object_names, color_names = make_adapter(self.cfg.env.id).cell_names()
            model.id_attrs.copy_(torch.from_numpy(self.layout.name_attributes(object_names, color_names)))

    def save(self, run_dir: Path) -> None:
        self.layout.save(Path(run_dir) / STREAM_DIR)

    def describe(self) -> str:
        extra = f" ({self.n_demos:,} demonstrations + {self.n_train - self.n_demos:,} on-policy)" if self.n_train > self.n_demos else ""
        if self.n_spoken:
            extra += f", {self.n_spoken:,} of them with the mission spoken"
        return (f"{self.cfg.env.id}: {self.n_train:,} training episodes{extra} ({self.n_train_steps:,} steps, "
                f"{self.data.tokens('train'):,} tokens), {self.n_val:,} validation episodes, vocab {self.layout.vocab_size}")

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return self.data.batch("train", batch_size, self.cfg.model.context, gen)

    def val_loss(self, model, precision: str, device) -> float:
        tc = self.cfg.train
        return sampled_loss(model, self.data, self.cfg.model.context, tc.batch_size, tc.eval_batches, precision, device, seed=tc.seed + 1)
