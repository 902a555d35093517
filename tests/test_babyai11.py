"""The BabyAI-1.1-style baseline (benchmarks/babyai11.py): shapes, the mission conditions the output
(FiLM), the LSTM memory carries earlier steps, behaviour cloning learns a tiny fixed batch, and the
agent plays real episodes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldloom.errors import DataError
from worldloom.world.data.episodes import Episode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import babyai11 as B
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

MISSIONS = ["go to the red ball", "go to the green key", "pick up the blue box"]


def views(*shape, seed=0) -> torch.Tensor:
    """Random MiniGrid-like views (..., 7, 7, 3): object 0..10, colour 0..5, state 0..2."""
    g = np.random.default_rng(seed)
    hi = np.array([11, 6, 3])
    return torch.from_numpy((g.integers(0, 1 << 16, (*shape, 7, 7, 3)) % hi).astype(np.uint8))


def agent(dim=32, seed=0) -> tuple[B.BabyAI11, B.Vocab]:
    torch.manual_seed(seed)
    vocab = B.Vocab(MISSIONS)
    return B.BabyAI11(7, len(vocab), dim).eval(), vocab


def test_vocab_encodes_words_pads_and_marks_unknown_words():
    vocab = B.Vocab(MISSIONS)
    ids, lens = vocab.encode(["Go to the red ball.", "open the purple door", ""])
    assert ids.shape == (3, 5) and lens.tolist() == [5, 4, 1]
    assert (ids[0] >= 2).all() and ids[0, 4] == vocab.ids["ball"] and ids[1, 1] == vocab.ids["the"]
    assert ids[1, [0, 2, 3]].tolist() == [B.UNK] * 3 and ids[1, 4] == B.PAD and ids[2].tolist() == [B.PAD] * 5


def test_shapes_a_batch_of_steps_gives_action_logits():
    model, vocab = agent()
    instr = model.encode_mission(*vocab.encode(MISSIONS))
    assert instr.shape == (3, 32)
    logits, (h, c) = model(views(3, 5), instr)
    assert logits.shape == (3, 5, 7) and h.shape == c.shape == (3, 32) and torch.isfinite(logits).all()
    one, mem = model.step(views(3), instr, model.zero_memory(3))
    assert one.shape == (3, 7) and mem[0].shape == (3, 32)
    assert 0.9e6 < B.BabyAI11(7, 40).num_params() < 1.3e6  # about 1M at the defaults
    critic = B.BabyAI11(7, 40, critic=True)
    assert critic.value(torch.zeros(2, 128)).shape == (2,)
    with pytest.raises(ValueError, match="critic"):
        model.value(h)


def test_film_conditions_the_output_on_the_mission():
    model, vocab = agent()
    x = views(3, 2, seed=1)
    same = model.encode_mission(*vocab.encode([MISSIONS[0]] * 3))
    other = model.encode_mission(*vocab.encode([MISSIONS[0], MISSIONS[1], MISSIONS[2]]))
    a, _ = model(x, same)
    b, _ = model(x, other)
    assert torch.equal(a[0], b[0])  # the same mission and views: the same output
    assert not torch.allclose(a[1], b[1], atol=1e-5) and not torch.allclose(a[2], b[2], atol=1e-5)
    # the mission reaches the policy through FiLM: with the FiLM scale and shift zeroed it has no effect
    for film in model.films:
        for lin in (film.gamma, film.beta):
            torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    a, _ = model(x, same)
    b, _ = model(x, other)
    assert torch.allclose(a, b)


def test_the_memory_carries_earlier_steps_and_forward_matches_stepping():
    model, vocab = agent()
    instr = model.encode_mission(*vocab.encode(MISSIONS[:2]))
    x = views(2, 4, seed=2)
    y = x.clone()
    y[:, 0] = views(2, seed=3)  # a different first view, the same later views
    a, _ = model(x, instr)
    b, _ = model(y, instr)
    assert not torch.allclose(a[:, 3], b[:, 3], atol=1e-5)  # step 3 remembers step 0
    mem, steps = model.zero_memory(2), []
    for t in range(4):
        out, mem = model.step(x[:, t], instr, mem)
        steps.append(out)
    assert torch.allclose(torch.stack(steps, 1), a, atol=1e-5)
    # a padded step (valid False) leaves the memory as it was
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    _, (h, _) = model(x, instr, None, valid)
    _, (h2, _) = model(x[:, :2], instr)
    assert torch.allclose(h[1], h2[1], atol=1e-6) and not torch.allclose(h[0], h2[0], atol=1e-5)


def episode(seed: int, mission: str, T: int, actions, random_first: bool = False) -> Episode:
    obs = {"image": views(T + 1, seed=seed).numpy(), "direction": np.zeros(T + 1, np.uint8)}
    rand = np.zeros(T, bool)
    rand[:1] = random_first
    return Episode(seed=seed, mission=mission, obs=obs, action=np.array(actions), reward=np.zeros(T, np.float32),
                   terminated=True, truncated=False, random_action=rand)


def test_behaviour_cloning_updates_reduce_the_loss_on_a_tiny_batch():
    eps = [episode(0, MISSIONS[0], 5, [2, 2, 0, 2, 6]), episode(1, MISSIONS[1], 3, [1, 2, 3], random_first=True),
           episode(2, MISSIONS[2], 7, [0, 0, 2, 2, 1, 2, 3])]
    demos = B.Demos.from_episodes(eps)
    assert demos.images.shape == (15, 7, 7, 3) and demos.labels[5] == -1  # a random action is not a target
    model, vocab = agent(seed=1)
    batch = demos.batch([0, 1, 2], vocab)
    assert batch["images"].shape == (3, 7, 7, 7, 3) and batch["valid"].sum() == 15 and (batch["labels"] >= 0).sum() == 14
    before = B.bc_loss(model, demos, vocab)
    assert abs(before - np.log(7)) < 0.5  # an untrained agent is close to uniform
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = [B.bc_update(model, opt, batch, bptt=3) for _ in range(25)]
    assert losses[-1] < 0.3 * losses[0]
    with pytest.raises(DataError, match="no episode"):
        B.Demos.from_episodes([episode(3, "", 0, [])])
    with pytest.raises(DataError, match="grid view field 'pixels'"):
        B.Demos.from_episodes(eps, field="pixels")
    fit = B.train_bc(model, demos, vocab, minutes=5.0, batch_episodes=2, max_updates=4)
    assert fit["updates"] == 4 and fit["epochs"] > 0 and fit["minutes"] < 5.0


def test_play_real_episodes_batched_and_reproducible():
    from worldloom.world.envs import make_adapter

    adapter = make_adapter("BabyAI-GoToLocal-v0")
    model, vocab = agent(dim=16)
    seeds = [2_000_000, 2_000_001, 2_000_002]
    res = B.play(model, vocab, adapter, seeds, envs=2, greedy=False, seed=5)
    assert len(res) == 3 and all(1 <= n <= 64 for _, _, n in res) and all(s == (r > 0) for s, r, _ in res)
    assert B.play(model, vocab, adapter, seeds, envs=2, greedy=False, seed=5) == res  # seeded sampling
    greedy = B.play(model, vocab, adapter, seeds, envs=2, greedy=True)
    assert B.play(model, vocab, adapter, seeds, envs=3, greedy=True) == greedy  # the waves do not matter
    s = B.summary(res, seeds)
    assert s["episodes"] == 3 and s["seeds"] == [2_000_000, 2_000_002] and 0 <= s["success"] <= 1
