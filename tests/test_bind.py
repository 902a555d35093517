"""Modality binding (issue 16, part 6): InfoNCE against hand-worked values, retrieval metrics on a
constructed case, items checked against the real environment, the bind recipe end to end, one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from worldloom.bind.items import VAL_SEEDS, caption, make_items, nearest_target
from worldloom.bind.loss import bind_objective, info_nce
from worldloom.bind.model import BindOutput
from worldloom.bind.retrieval import chance_at, content_ids, equivalent, retrieval
from worldloom.config import build_config
from worldloom.errors import ConfigError

from test_checkpoint_errors import cli_error

GOTO = "BabyAI-GoToObj-v0"

# ---------------------------------------------------------------- InfoNCE


def test_info_nce_matches_the_hand_worked_2x2_case():
    # a = e1, e2; b = e1, (0.6, 0.8); scale 2: S = [[2, 1.2], [0, 1.6]]
    # rows (a -> b): log(1 + e^-0.8) = 0.371101, log(1 + e^-1.6) = 0.183901; mean 0.277501
    # columns (b -> a): log(1 + e^-2) = 0.126928, log(1 + e^-0.4) = 0.513015; mean 0.319972
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert info_nce(a, b, 2.0).item() == pytest.approx(0.5 * (0.277501 + 0.319972), abs=1e-5)
    assert info_nce(b, a, 2.0).item() == pytest.approx(info_nce(a, b, 2.0).item(), abs=1e-6)  # symmetric


def test_info_nce_3x3_and_the_objective_averages_its_pairs():
    # three orthogonal units, scale 1: every row and column is log(e + 2) - 1 = 0.551445
    eye = torch.eye(3)
    assert info_nce(eye, eye, 1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    # swapped partners score worse than matched ones
    assert info_nce(eye, eye[[1, 0, 2]], 1.0).item() > info_nce(eye, eye, 1.0).item()
    out = BindOutput({"view": eye, "text": eye, "actions": eye[[1, 0, 2]]}, torch.tensor(1.0))
    got = bind_objective([("view", "text"), ("actions", "text")])(out, {})
    want = (info_nce(eye, eye, 1.0) + info_nce(eye[[1, 0, 2]], eye, 1.0)) / 2
    assert got.total.item() == pytest.approx(want.item(), abs=1e-6)
    assert got.parts["temperature"] == 1.0 and set(got.parts) == {"loss", "temperature", "loss_view-text", "loss_actions-text"}


# ---------------------------------------------------------------- retrieval metrics


def test_retrieval_on_a_constructed_case():
    # items 0 and 1 share their B content (e.g. one caption for two views); item 2 is alone
    right = equivalent(np.array([0, 1, 2]), np.array([0, 0, 1]))
    assert right.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.5, 0.3]])  # A queries x B candidates
    r = retrieval(sim, torch.eye(3), right)  # emb_a @ eye.T = sim
    # A -> B: query 0 takes 0 (right), query 1 takes 0 (right: same B as 1), query 2 takes 1 (wrong)
    assert r["a_to_b"]["r1"] == pytest.approx(2 / 3) and r["a_to_b"]["r5"] == 1.0
    # B -> A (columns): candidate 0 takes query 0, 1 takes 2 (wrong), 2 takes 2
    assert r["b_to_a"]["r1"] == pytest.approx(2 / 3)
    # chance R@1 = mean of right counts / N = (2 + 2 + 1) / 9; R@5 with 3 candidates: all of them
    assert r["a_to_b"]["chance_r1"] == pytest.approx(5 / 9) and r["a_to_b"]["chance_r5"] == 1.0
    # chance R@2 among 4 with one right candidate: 1 - C(3, 2) / C(4, 2) = 1/2
    assert chance_at(np.eye(4, dtype=bool), 2) == pytest.approx(0.5)
    assert content_ids(np.array(["b", "a", "b"])).tolist() == [1, 0, 1]
    assert content_ids(np.array([[1, 2], [1, 2], [0, 2]])).tolist() == [1, 1, 0]


# ---------------------------------------------------------------- items against the real environment


@pytest.mark.parametrize("env_id", [GOTO, "BabyAI-GoToLocal-v0"])
def test_paths_reach_the_object_and_captions_name_where_it_is(env_id):
    import gymnasium as gym
    import minigrid  # noqa: F401

    env, checked = gym.make(env_id), 0
    for seed in range(40):
        obs, _ = env.reset(seed=seed)
        found = nearest_target(obs["image"])
        if found is None:
            continue
        (x, y), actions = found
        u = env.unwrapped
        ahead, side = 6 - y, x - 3
        place = np.array(u.agent_pos) + ahead * u.dir_vec + side * u.right_vec
        obj = u.grid.get(*place)
        text = caption(obs["image"], (x, y))
        assert text.startswith(f"the {obj.color} {obj.type} is "), text
        assert ("ahead" in text) == (ahead > 0) and ("left" in text) == (side < 0) and ("right" in text) == (side > 0)
        for i, a in enumerate(actions):
            _, reward, term, _, _ = env.step(a)
            if term and i < len(actions) - 1:  # GoToLocal: passing the mission's object on the way ends the level
                break
        else:
            assert tuple(np.array(u.agent_pos) + u.dir_vec) == tuple(place), (seed, actions)  # facing the object
            assert env_id != GOTO or (term and reward > 0)  # GoToObj: its one object is the mission: solved
            checked += 1
    assert checked >= 10


def test_items_come_from_their_seeds_and_refuse_pixel_views():
    from worldloom.errors import DataError

    items = make_items(GOTO, 12, VAL_SEEDS, per_level=4, action_len=12)
    assert items["image"].shape == (12, 7, 7, 3) and items["actions"].shape == (12, 12) and len(items["text"]) == 12
    assert items["seed"].min() >= VAL_SEEDS and (items["actions"][:, 0] >= 0).all()  # every path has an action
    with pytest.raises(DataError, match="symbolic MiniGrid"):
        make_items("rgb:" + GOTO, 2, 0, 1, 12)


# ---------------------------------------------------------------- the recipe end to end

TINY = ["bind.items=96", "bind.val_items=40", "bind.dim=16", "bind.channels=8", "model.d_model=32", "model.n_head=2",
        "model.n_layer=1", "train.batch_size=16", "train.max_steps=6", "train.eval_interval=3", "train.log_interval=1",
        "train.max_minutes=0", "train.lr=0.003"]


def test_train_eval_and_refusals(tmp_path, capsys):
    from worldloom.bind.items import load_items
    from worldloom.cli import main
    from worldloom.run import load_run

    run = tmp_path / "bind"
    assert main(["train", "bind", "--no-progress", f"out_dir={tmp_path}", "name=bind", *TINY]) == 0
    train, val = load_items(run / "items" / "train.npz"), load_items(run / "items" / "val.npz")
    assert train["seed"].max() < VAL_SEEDS <= val["seed"].min()  # held-out items: levels never trained on
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["items"] == 40 and res["step"] == 6 and res["trained_pairs"] == ["actions-text", "view-text"]
    pairs = res["pairs"]
    assert {k: v["trained"] for k, v in pairs.items()} == {"view-text": True, "view-actions": False, "text-actions": True}
    for way in ("view_to_actions", "actions_to_view"):
        r = pairs["view-actions"][way]
        assert 0 <= r["r1"] <= r["r5"] <= 1 and 0 < r["chance_r1"] <= r["chance_r5"] <= 1
    assert main(["eval", str(run)]) == 0
    assert "| view -> actions | no |" in capsys.readouterr().out
    line = cli_error(capsys, ["generate", str(run), "hello"])
    assert "bind run" in line and "worldloom eval" in line
    assert main(["train", "--resume", str(run), "--no-progress", "train.max_steps=8"]) == 0  # the same items, further
    assert np.array_equal(load_items(run / "items" / "train.npz")["image"], train["image"])
    assert load_run(run, any_model=True).state["step"] == 8


def test_bind_config_errors(tmp_path, capsys):
    for bad, msg in [("bind.pairs=view-view", "bind.pairs must be"), ("bind.pairs=view-sound", "bind.pairs must be"),
                     ("bind.pairs=", "bind.pairs must be"), ("bind.temperature=0", "bind.temperature"),
                     ("bind.item=5", "did you mean 'bind.items'")]:
        with pytest.raises(ConfigError, match=msg):
            build_config("bind", [bad])
    line = cli_error(capsys, ["train", "bind", "--no-progress", f"out_dir={tmp_path}", "name=short", *TINY, "bind.text_len=3"])
    assert "longer than bind.text_len=3" in line
    line = cli_error(capsys, ["train", "bind", "--no-progress", f"out_dir={tmp_path}", "name=big", *TINY, "train.batch_size=200"])
    assert "larger than bind.items=96" in line
