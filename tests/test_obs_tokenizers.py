"""The observation-tokenizer protocol and registry (worldloom.tokenize.base), the stream layout over
any observation tokenizer, run folders written before the registry, and the environment adapter's
side of it (tokenizer, observation form and space, pictures, action names)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from worldloom.config import StreamConfig
from worldloom.errors import CheckpointError
from worldloom.tokenize import OBS_TOKENIZERS, GridTokenizer, ObsTokenizer, load_obs_tokenizer, register_obs_tokenizer
from worldloom.world.envs import make_adapter
from worldloom.world.stream import StreamLayout

from conftest import WORLD_ENV

OLD_STREAM = Path(__file__).parent / "data" / "stream-fe7e378"  # a run's stream/ as the code before the registry wrote it
SRC = Path(__file__).resolve().parents[1] / "src" / "worldloom"


class PixelBins:
    """A toy observation tokenizer: a (2, 2) grey ``pixels`` field, 4 levels per pixel, one token each."""

    kind = "test-pixels"
    fields = ("pixels",)
    n_tokens, vocab_size = 4, 4

    def token_ranges(self):
        return [(0, 4)] * 4

    def encode_batch(self, fields):
        return (np.asarray(fields["pixels"]).reshape(-1, 4) // 64).astype(np.int64)

    def decode_batch(self, ids):
        return {"pixels": (np.clip(np.asarray(ids), 0, 3) * 64).astype(np.uint8).reshape(-1, 2, 2)}

    def save(self, folder):
        (Path(folder) / "pixel_bins.json").write_text("{}")

    @classmethod
    def load(cls, folder):
        if not (Path(folder) / "pixel_bins.json").is_file():
            raise CheckpointError(f"{folder} has no pixel_bins.json")
        return cls()


@pytest.fixture
def pixel_bins():
    register_obs_tokenizer(PixelBins)
    yield PixelBins
    OBS_TOKENIZERS.pop(PixelBins.kind)


# ---------------------------------------------------------------- the protocol and the registry


def test_the_grid_tokenizer_is_a_registered_observation_tokenizer():
    grid = GridTokenizer()
    assert isinstance(grid, ObsTokenizer) and OBS_TOKENIZERS["grid"] is GridTokenizer
    assert len(grid.token_ranges()) == grid.n_tokens and grid.fields == ("image", "direction")
    with pytest.raises(ValueError, match="registered twice"):
        register_obs_tokenizer(GridTokenizer)


def test_the_stream_takes_any_observation_tokenizer(pixel_bins, tmp_path):
    """A layout over the toy tokenizer encodes, decodes, saves and loads it back by its recorded kind."""
    lay = StreamLayout.build(["go"], 3, StreamConfig(), obs=PixelBins())
    assert lay.obs_len == 4 and lay.step_len == 7 and lay.size["obs"] == 4
    pixels = np.array([[[0, 64], [128, 192]], [[255, 0], [0, 0]]], np.uint8)
    ids = lay.encode_obs({"pixels": pixels})
    assert ids.shape == (2, 4) and (ids >= lay.offset["obs"]).all() and (ids < lay.offset["obs"] + 4).all()
    assert np.array_equal(lay.decode_obs(ids)["pixels"], (pixels // 64) * 64)
    lay.save(tmp_path / "stream")
    assert json.loads((tmp_path / "stream" / "stream.json").read_text())["obs_tokenizer"] == "test-pixels"
    back = StreamLayout.load(tmp_path / "stream")
    assert isinstance(back.obs, PixelBins) and back.vocab_size == lay.vocab_size
    with pytest.raises(ValueError, match="missing"):
        lay.encode_obs({"image": pixels})


def test_an_unknown_kind_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="kind 'vq'.*known: .*grid") as e:
        load_obs_tokenizer("vq", tmp_path)
    assert "\n" not in str(e.value)
    shutil.copytree(OLD_STREAM, tmp_path / "stream")
    meta = json.loads((tmp_path / "stream" / "stream.json").read_text())
    (tmp_path / "stream" / "stream.json").write_text(json.dumps({**meta, "obs_tokenizer": "vq"}))
    with pytest.raises(CheckpointError, match="'vq'"):
        StreamLayout.load(tmp_path / "stream")


# ---------------------------------------------------------------- old run folders


def test_a_stream_folder_written_before_the_registry_loads(tmp_path):
    """stream.json without an obs_tokenizer key (grid_tokenizer.json beside it) is a grid layout, the same
    one: saved again, every old file is unchanged and only the kind is added."""
    lay = StreamLayout.load(OLD_STREAM)
    assert isinstance(lay.obs, GridTokenizer) and lay.obs.view == 7 and lay.vocab_size == 246
    lay.save(tmp_path)
    old_meta = json.loads((OLD_STREAM / "stream.json").read_text())
    assert json.loads((tmp_path / "stream.json").read_text()) == {**old_meta, "obs_tokenizer": "grid"}
    for f in ("grid_tokenizer.json", "mission/tokenizer.json", "mission/tokenizer_meta.json"):
        assert (tmp_path / f).read_bytes() == (OLD_STREAM / f).read_bytes(), f
    again = StreamLayout.load(tmp_path)
    assert again.offset == lay.offset and np.array_equal(again.step_ranges, lay.step_ranges)


# ---------------------------------------------------------------- the environment adapter's side


def test_the_minigrid_adapter_declares_its_tokenizer_spaces_and_names(world_dataset):
    adapter = make_adapter(WORLD_ENV)
    meta = json.loads((world_dataset / "meta.json").read_text())
    tok = adapter.obs_tokenizer(meta)
    assert isinstance(tok, GridTokenizer) and tok.view == 7 and adapter.obs_tokenizer().view == 7
    meta["obs_fields"]["image"]["shape"] = [5, 5, 3]
    assert adapter.obs_tokenizer(meta).n_tokens == 26
    assert len(adapter.action_names) == adapter.n_actions == 7 and adapter.action_names[2] == "forward"
    env = adapter.make()
    raw, _ = env.reset(seed=1)
    env.close()
    fields = adapter.observe(raw)
    obs = adapter.env_obs(fields, adapter.mission(raw))
    assert adapter.observation_space().contains(obs)
    assert np.array_equal(obs["image"], raw["image"]) and obs["direction"] == raw["direction"]
    assert obs["mission"] == raw["mission"] and obs["image"] is not fields["image"]
    assert adapter.render(fields, tile_size=4).shape == (28, 28, 3)


def test_nothing_outside_the_adapters_and_the_grid_tokenizer_imports_minigrid():
    allowed = {SRC / "tokenize" / "grid.py"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path in allowed or (SRC / "world" / "envs") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(SRC)}: {n}" for n in names if n.split(".")[0] == "minigrid"]
    assert not offenders
