"""stream.names: mission words and the grid cells that show what they name share attribute vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldloom.config import StreamConfig, build_config
from worldloom.errors import DataError
from worldloom.tokenize.grid import GridTokenizer
from worldloom.world.envs.minigrid import MiniGridAdapter
from worldloom.world.stream import StreamLayout

from conftest import TINY_WORLD


def _ids(lay: StreamLayout):
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

    tok = lay.obs
    red_ball = lay.offset["obs"] + (OBJECT_TO_IDX["ball"] * tok.n_colors + COLOR_TO_IDX["red"]) * tok.n_states
    word = {w: lay.offset["mission"] + lay.mission.tok.get_vocab()[w] for w in ("go", "red", "ball", "box")}
    return red_ball, word, OBJECT_TO_IDX, COLOR_TO_IDX


def test_cells_show_and_words_name_the_same_attributes():
    lay = StreamLayout.build(["go to the red ball", "pick up the green box"], 7, StreamConfig(), GridTokenizer())
    attrs = lay.name_attributes(*MiniGridAdapter.cell_names())
    red_ball, word, obj, col = _ids(lay)
    n_obj = lay.obs.n_objects
    assert attrs[red_ball].tolist() == [obj["ball"] + 1, n_obj + col["red"] + 1]
    assert attrs[word["red"]].tolist() == [n_obj + col["red"] + 1, 0]
    assert attrs[word["ball"]].tolist() == [obj["ball"] + 1, 0]
    assert attrs[word["box"]].tolist() == [obj["box"] + 1, 0]
    assert attrs[word["go"]].tolist() == [0, 0]
    assert not attrs[lay.offset["action"] : lay.offset["action"] + 7].any()  # actions name nothing
    assert attrs.max() <= n_obj + lay.obs.n_colors


def test_a_run_with_names_keeps_them_and_embeds_them(tmp_path, world_dataset):
    from worldloom.run import load_world_run
    from worldloom.train import train

    cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={tmp_path}", "name=names", "stream.names=true"])
    train(cfg, progress=False, log=lambda *a: None)
    run = load_world_run(cfg.run_dir)
    model, lay = run.model, run.layout
    assert model.cfg.name_attrs == lay.obs.n_objects + lay.obs.n_colors
    assert np.array_equal(model.id_attrs.numpy(), lay.name_attributes(*MiniGridAdapter.cell_names()))  # saved, loaded
    red_ball, word, obj, col = _ids(lay)
    with torch.no_grad():
        extra = lambda i: (model.token_embed(torch.tensor([i])) - model.embed(torch.tensor([i])))[0]  # noqa: E731
        red = model.attr_embed.weight[lay.obs.n_objects + col["red"] + 1]
        ball = model.attr_embed.weight[obj["ball"] + 1]
        assert torch.allclose(extra(word["red"]), red) and torch.allclose(extra(word["ball"]), ball)
        assert torch.allclose(extra(red_ball), red + ball)
        assert red.abs().sum() > 0 and not extra(word["go"]).any()


def test_names_need_grid_cells():
    from worldloom.tokenize import load_obs_tokenizer  # noqa: F401
    from worldloom.world.task import stream_model_sizes

    class Pixels:
        kind, view = "pixels", 0

    lay = StreamLayout.build(["go"], 3, StreamConfig(), GridTokenizer())
    lay.obs = Pixels()
    with pytest.raises(DataError, match="stream.names"):
        stream_model_sizes(lay, StreamConfig(names=True))
