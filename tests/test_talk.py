"""A world model that talks (worldloom.talk, recipe talk): the program's texts against hand-made views,
the talk stream, and a tiny run through train -> generate --view / --draw -> eval, with its errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
from PIL import Image

from worldloom.cli import main
from worldloom.config import StreamConfig, TalkConfig, build_config
from worldloom.errors import ConfigError
from worldloom.talk.stream import (TalkData, TalkEpisode, TalkSegment, draw_segment, read_segment, talk_items, text_ids,
                                   text_of)
from worldloom.talk.text import (Fact, caption, check_pairs, drawn_right, facts_of, mentions, norm, parse_caption,
                                 parse_fact, questions, tidy, vocabulary)
from worldloom.tokenize import GridTokenizer
from worldloom.world.stream import SEP, StreamLayout

from conftest import WORLD_ENV


def view(*cells) -> np.ndarray:
    """A 7x7 view of empty floor with a wall across the far row and (object, colour, i, j) cells."""
    image = np.zeros((7, 7, 3), np.uint8)
    image[..., 0] = OBJECT_TO_IDX["empty"]
    image[:, 0, 0] = OBJECT_TO_IDX["wall"]
    image[:, 0, 1] = COLOR_TO_IDX["grey"]
    for obj, colour, i, j in cells:
        image[i, j] = (OBJECT_TO_IDX[obj], COLOR_TO_IDX[colour], 0)
    return image


# a red ball two ahead one left, a blue key right in front, a purple key four ahead three right
GRID = view(("ball", "red", 2, 4), ("key", "blue", 3, 5), ("key", "purple", 6, 2))


def test_caption_lists_objects_nearest_first_with_places():
    facts = facts_of(GRID)
    assert facts == [Fact("key", "blue", 0, 1), Fact("ball", "red", -1, 2), Fact("key", "purple", 3, 4)]
    assert tidy(caption(facts)) == ("a blue key one step ahead; a red ball two steps ahead, one to the left; "
                                    "a purple key four steps ahead, three to the right")
    assert caption(facts_of(view())) == "nothing"  # walls and floor are not objects
    moved = view(("ball", "red", 2, 6))  # beside the agent: no step ahead
    assert caption(facts_of(moved)) == "a red ball one to the left"


def test_parser_reads_captions_back():
    facts = facts_of(GRID)
    assert parse_caption(caption(facts)) == facts
    assert parse_caption(tidy(caption(facts))) == facts  # the form people type
    assert parse_fact("a red ball two steps ahead") == Fact("ball", "red", 0, 2)
    assert parse_caption("a red ball two steps ahead; a big dog") == [Fact("ball", "red", 0, 2), None]
    assert parse_caption("a red ball") == [None]  # a fact needs a place
    assert parse_caption("nothing") == []


def test_questions_and_answers():
    qa = dict(questions(GRID, "go to the red ball"))
    assert qa["Q: what is in front of you ? A:"] == "a blue key"
    assert qa["Q: how many keys ? A:"] == "two"
    assert qa["Q: how many balls ? A:"] == "one"
    assert qa["Q: how many boxes ? A:"] == "zero"
    assert qa["Q: where is the goal ? A:"] == "two steps ahead , one to the left"
    assert dict(questions(GRID, "go to a key"))["Q: where is the goal ? A:"] == \
        "one step ahead and four steps ahead , three to the right"
    assert dict(questions(GRID, "go to the grey box"))["Q: where is the goal ? A:"] == "not in view"
    assert "Q: where is the goal ? A:" not in dict(questions(GRID, "get to the exit"))
    walled = view(("wall", "grey", 3, 5))
    assert dict(questions(walled))["Q: what is in front of you ? A:"] == "a wall"
    assert dict(questions(view()))["Q: what is in front of you ? A:"] == "nothing"


def test_drawn_views_are_checked_cell_by_cell():
    facts = facts_of(GRID)
    assert drawn_right(GRID, facts) == [True, True, True]
    wrong = GRID.copy()
    wrong[2, 4, 1] = COLOR_TO_IDX["green"]  # the red ball drawn green
    assert drawn_right(wrong, facts) == [True, False, True]
    assert drawn_right(view(), [Fact("ball", "red", 0, 7)]) == [False]  # a place outside the view


def test_every_word_is_in_the_vocabulary_and_pairs_are_checked():
    words = set(vocabulary().split())
    for image, mission in ((GRID, "go to the red ball"), (view(("box", "yellow", 0, 0)), "go to a box")):
        for prompt, answer in talk_items(image, mission):
            assert set(norm(f"{prompt} {answer}").split()) <= words
    assert check_pairs(" purple key, yellow  box ") == ("purple key", "yellow box")
    assert mentions("a purple key one step ahead", ("purple key",)) and not mentions("a purple keyring", ("purple key",))
    with pytest.raises(ValueError, match="pink ball"):
        check_pairs("pink ball")
    with pytest.raises(ConfigError, match="talk.held_out"):
        TalkConfig(held_out="purple")
    with pytest.raises(ConfigError, match="talk.fraction"):
        build_config("babyai-talk", ["talk.fraction=2"])


@pytest.fixture(scope="module")
def layout():
    return StreamLayout.build(["go to the red ball", vocabulary()], 7, StreamConfig(), GridTokenizer())


def test_talk_segments_round_trip(layout):
    obs = layout.encode_obs({"image": GRID[None], "direction": np.array([1])})[0]
    items = talk_items(GRID, "go to the red ball")
    seq, P, seg = read_segment(layout, "go to the red ball", obs, items, 2.0)
    assert np.array_equal(seq[P: P + 50], obs) and list(seg.slots[P: P + 50]) == list(range(1, 51))
    assert seg.slots[:P].max() == 0 and seg.slots[P + 50:].max() == 0 and seg.weight[: P + 50].max() == 0
    texts = text_of(layout, seq[P + 50:]), [norm(f"{p} {a}") for p, a in items]
    assert texts[0] == " ".join(texts[1])  # <sep> skipped by text_of
    ends = np.flatnonzero(seq == SEP)[1:]  # each answer ends with <sep> (the first ends the mission)
    assert len(ends) == len(items) and (seg.weight[ends] == 2.0).all()
    weighted = text_of(layout, seq[seg.weight > 0])
    assert weighted == " ".join(norm(a) for _, a in items)  # only answers are learned
    assert layout.decode_obs(seq[None, P: P + 50])["image"][0].tolist() == GRID.tolist()
    seq, P, seg = draw_segment(layout, caption(facts_of(GRID)), obs, 1.0)
    assert text_of(layout, seq[:P]) == norm("draw: " + caption(facts_of(GRID)))
    assert (seg.weight[P:] == 1.0).all() and seg.weight[:P].max() == 0 and np.array_equal(seq[P:], obs)


def test_talk_data_mixes_segments_and_hides_held_out_pairs(layout):
    obs = layout.encode_obs({"image": np.stack([GRID, GRID]), "direction": np.array([0, 0])})
    steps = np.concatenate([obs, layout.action_ids([2, 2])[:, None], layout.reward_ids([0, 0])[:, None],
                            layout.done_ids([False, True], [False, False])[:, None]], axis=1)
    ep = TalkEpisode(layout.prefix("go to the red ball"), steps, layout.action_ids([2, 2]), images=np.stack([GRID, GRID]),
                     mission="go to the red ball", hide=("purple key",))
    data = TalkData(layout, [ep], [ep], StreamConfig(), TalkConfig(fraction=1.0, draw=0.5), step_skip=True)
    import torch

    def kinds_of_rows(episode, n=30):
        kinds = []
        for _ in range(n):
            seq, P, seg = data.row(episode, 256, gen=gen)
            kinds.append("episode" if not isinstance(seg, TalkSegment) else
                         "draw" if text_of(layout, seq[:P]).startswith("draw:") else "read")
            assert kinds[-1] == "episode" or not mentions(text_of(layout, seq), episode.hide)
        return set(kinds)

    gen = torch.Generator().manual_seed(0)
    # the only caption names the hidden purple key: never drawn from (the episode comes instead), never told
    assert kinds_of_rows(ep) == {"read", "episode"}
    told = dataclasses.replace(ep, hide=())
    assert kinds_of_rows(told) == {"read", "draw"}  # fraction 1: every row of the episode talks
    batch = data.batch("train", 4, 256, gen)
    assert batch["part_text"].any() and batch["skip"].shape == batch["input"].shape
    assert not (batch["part_text"] & batch["part_obs"]).any()


TINY_TALK = ["data.episodes=40", "data.val_episodes=12", "data.workers=1", "model.n_layer=1", "model.d_model=32",
             "model.n_head=2", "model.context=384", "train.batch_size=4", "train.max_steps=4", "train.max_minutes=0",
             "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=1", "train.warmup_steps=1",
             "train.precision=fp32", "train.device=cpu", "train.threads=1", "eval.episodes=3", "eval.envs=3",
             "talk.eval_views=4"]


@pytest.fixture(scope="module")
def talk_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("talk")
    assert main(["train", "babyai-talk", *TINY_TALK, f"out_dir={out}", "name=talk", "--no-progress"]) == 0
    return out / "talk"


def test_train_generate_eval(talk_run, capsys, tmp_path):
    res = json.loads((talk_run / "eval.json").read_text())
    for name in ("views", "held_out_pairs"):
        assert res[name]["n_views"] == 4 and 0 <= res[name]["qa"] <= 1 and 0 <= res[name]["caption_attr"] <= 1
    assert res["held_out_pairs"]["pairs"] == ["purple key", "yellow box"] and res["real"]["episodes"] == 3
    assert any('"loss_text"' in line for line in (talk_run / "metrics.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert main(["generate", str(talk_run), "--view", "seed=3", "Q: what is in front of you? A:", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Q: what is in front of you? A:")
    png = tmp_path / "view.png"
    assert main(["generate", str(talk_run), "--draw", "a red ball two steps ahead", "--out", str(png)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {png}"
    with Image.open(png) as im:
        assert im.size == (112, 112)  # 7 cells of 16 px
    assert main(["eval", str(talk_run), "--json", "--episodes", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["real"]["episodes"] == 2 and set(out["views"]) >= {"caption_attr", "caption_exact", "qa", "draw_attr"}


@pytest.mark.parametrize("args, message", [
    (["--view", "3", "caption:"], "--view takes seed=N"),
    (["--view", "seed=3"], "--view needs a text"),
    (["--view", "seed=3", "caption:", "--draw", "a red ball"], "choose one"),
    (["--draw", "a pink ball two steps ahead"], "never learned: pink"),
    (["--draw", "a red ball", "more"], "--draw takes the description"),
])
def test_talk_generate_errors(talk_run, capsys, args, message):
    assert main(["generate", str(talk_run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_view_on_a_world_run_is_one_line(world_run, capsys):
    assert main(["generate", str(world_run), "--view", "seed=3", "caption:"]) == 2
    err = capsys.readouterr().err.strip()
    assert "need a talk run" in err and len(err.splitlines()) == 1


def test_talk_refuses_a_frame_head(tmp_path, capsys):
    assert main(["train", "babyai-talk", *TINY_TALK, "stream.parallel_obs=true", f"out_dir={tmp_path}", "--no-progress"]) == 2
    assert "frame head" in capsys.readouterr().err


def test_env_is_the_worlds():
    assert build_config("babyai-talk", []).env.id == WORLD_ENV


@pytest.mark.parametrize("args", [["tune", "sft", "{run}", "data.path=x.jsonl"], ["quantize", "{run}", "--bits", "8", "name=q"]])
def test_text_only_commands_refuse_a_talk_run_as_a_world_run(talk_run, capsys, tmp_path, args):
    assert main([a.format(run=talk_run) for a in args] + [f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a talk (world) run" in err and len(err.splitlines()) == 1
