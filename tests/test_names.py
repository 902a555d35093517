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

from conftest import TINY_WORLD, runner_matches_forward


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


def _match_model(lay: StreamLayout, backbone: str = "transformer"):
    from worldloom.model import LWM

    cfg = build_config(None, [*TINY_WORLD, f"model.backbone={backbone}", "model.context=256"]).model
    cfg.vocab_size, cfg.slots = lay.vocab_size, lay.n_slots
    cfg.name_attrs, cfg.name_vectors, cfg.mission_match = lay.obs.n_objects + lay.obs.n_colors, False, True
    torch.manual_seed(0)
    model = LWM(cfg).eval()
    model.id_attrs.copy_(torch.from_numpy(lay.name_attributes(*MiniGridAdapter.cell_names())))
    return model


def test_mission_match_marks_the_cells_the_mission_names():
    """Worked by hand: behind "go to the red ball", a red ball is 1 + 1 + 2 = 4, a red key 3 (colour), a blue
    ball 2 (object), a grey wall 1 (neither); words, actions and the direction get 0. Behind "go to the blue
    ball" in the same row (a second episode), the blue ball is 4 and the red ball 2. The cached form (the rows'
    prefixes as mission=) gives the same marks."""
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

    lay = StreamLayout.build(["go to the red ball", "go to the blue ball"], 7, StreamConfig(), GridTokenizer())
    tok = lay.obs
    model = _match_model(lay)

    def cell(obj, colour):
        return lay.offset["obs"] + (OBJECT_TO_IDX[obj] * tok.n_colors + COLOR_TO_IDX[colour]) * tok.n_states

    cells = [cell("ball", "red"), cell("key", "red"), cell("ball", "blue"), cell("wall", "grey")]
    rows, slots = [], []
    for mission in ("go to the red ball", "go to the blue ball"):
        p = lay.prefix(mission)
        rows += [p, np.array(cells)]
        slots += [np.zeros(len(p), np.int64), np.arange(1, 5)]
    idx, sl = torch.from_numpy(np.concatenate(rows))[None], torch.from_numpy(np.concatenate(slots))[None]
    marks = model._mission_match(idx, sl, None)[0].tolist()
    P = len(lay.prefix("go to the red ball"))
    assert marks[:P] == [0] * P
    assert marks[P : P + 4] == [4, 3, 2, 1]
    assert marks[-4:] == [2, 1, 4, 1]
    pre = torch.from_numpy(lay.prefix("go to the red ball"))[None]
    cached = model._mission_match(torch.tensor([cells]), torch.arange(1, 5)[None], pre)[0].tolist()
    assert cached == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="mission"):
        model._mission_match(torch.tensor([cells]), torch.arange(1, 5)[None], None)


def test_mission_match_runner_matches_the_training_forward(world_dataset):
    """The runner's cached calls (no prefix in the rows fed) pass the missions and reproduce the full forward's
    policy logits; another mission moves them."""
    from worldloom.world.data.episodes import load_dataset

    eps = load_dataset(world_dataset).episodes("train")
    lay = StreamLayout.build(sorted({e.mission for e in eps}), 7, StreamConfig(), GridTokenizer())
    model = _match_model(lay)
    assert model.reads_mission
    seq, slots, skip, full, P = runner_matches_forward(model, lay, lay.episode(max(eps, key=lambda e: e.length)))
    L = lay.obs_len
    with torch.no_grad():  # the mission matters: with the marks zeroed the logits move
        model.match_embed.weight.zero_()
        assert not torch.allclose(model(seq, slots=slots, skip=skip).logits[0][P + L - 1], full[P + L - 1])


def test_a_run_with_match_trains_and_keeps_its_marks(tmp_path, world_dataset):
    from worldloom.run import load_world_run
    from worldloom.train import train

    cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={tmp_path}", "name=match", "stream.match=true"])
    train(cfg, progress=False, log=lambda *a: None)
    run = load_world_run(cfg.run_dir)
    assert run.model.match_embed is not None and run.model.attr_embed is None and run.model.reads_mission
    assert np.array_equal(run.model.id_attrs.numpy(), run.layout.name_attributes(*MiniGridAdapter.cell_names()))
    with pytest.raises(Exception, match="stream.match"):
        build_config(None, [*TINY_WORLD, "stream.match=true", "stream.obs=encoded", "stream.places=false"])
