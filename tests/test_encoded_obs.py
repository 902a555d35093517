"""Encoded observations (stream.obs=encoded, worldloom.modality): the frame encoder and decoder around
the backbone, the compression plan, causality, and the runner against the training forward."""

import numpy as np
import pytest
import torch

from worldloom.config import StreamConfig, build_config
from worldloom.errors import ConfigError
from worldloom.model import LWM
from worldloom.modality import FrameDecoder, FrameEncoder, FramePlan, backbone_positions
from worldloom.world.data.packing import EpisodeData

from conftest import TINY_WORLD, runner_matches_forward


def longest(eps):
    return max(eps, key=lambda e: e.length)


def encoded_model(layout, vectors=2, seed=0, backbone="transformer", context=256, film=False):
    """film: False, True (the mean word embedding conditions the frame encoder) or "gru" (a GRU read of the words)."""
    cfg = build_config(None, [*TINY_WORLD, f"model.backbone={backbone}", f"model.context={context}"]).model
    cfg.vocab_size, cfg.slots = layout.vocab_size, layout.n_slots
    cfg.obs_vectors, cfg.obs_len, cfg.obs_grid, cfg.obs_film = vectors, layout.obs_len, 7, bool(film)
    cfg.mission_encoder = "gru" if film == "gru" else "mean"
    torch.manual_seed(seed)
    return LWM(cfg).eval()


def test_encoder_and_decoder_shapes():
    enc = FrameEncoder(d_model=16, obs_len=50, grid=7, vectors=3)
    assert enc(torch.randn(5, 50, 16)).shape == (5, 3, 16)
    dec = FrameDecoder(d_model=16, obs_len=50, n_layer=1, n_head=2, d_ff=32)
    assert dec(torch.randn(5, 16), torch.randn(5, 50, 16)).shape == (5, 50, 16)


def test_plan_on_a_hand_made_row():
    """Step = 2 cells + a, r, d (slots 1..5); prefix of 2 (slot 0); the last frame is cut by the row end."""
    slots = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1]])
    plan = FramePlan.build(slots, obs_len=2, step_len=5, vectors=1)
    # backbone positions: p0 p1 F0 a r d F1 a r d (the cut frame dropped) = 10
    assert plan.length == 10
    assert plan.frame_src.tolist() == [2, 7] and plan.frame_dst.tolist() == [2, 6]
    assert plan.keep_src.tolist() == [0, 1, 4, 5, 6, 9, 10, 11]
    # first cells see the state before their frame; last cells see the frame; the cut cell the state before it
    assert plan.back[0].tolist() == [0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9]
    assert plan.decode_at.tolist() == [6, 11] and plan.decode_prev.tolist() == [2, 7]
    assert backbone_positions(2, 11, obs_len=2, step_len=5, vectors=1) == 10


def test_encoded_forward_is_causal(layout, episodes):
    """Changing a later observation changes no output (logits included) at earlier positions."""
    model = encoded_model(layout)
    data = EpisodeData(layout, [layout.episode(e) for e in episodes[0][:4]], [layout.episode(e) for e in episodes[1][:2]],
                       StreamConfig())
    batch = data.collate([[data.row(layout.episode(longest(episodes[0])), 400, start=0)]])
    inp, slots = batch["input"], batch["slots"]
    starts = torch.nonzero(slots[0] == 1).flatten()
    assert len(starts) >= 3, "the fixture episode should have three observations"
    cut = int(starts[2])
    changed = inp.clone()
    changed[0, cut : cut + 49] = layout.offset["obs"] + 1  # an arbitrary other frame from the third observation on
    with torch.no_grad():
        a, b = model(inp, slots=slots), model(changed, slots=slots)
    torch.testing.assert_close(a.logits[:, :cut], b.logits[:, :cut])
    assert not torch.allclose(a.logits[:, cut:], b.logits[:, cut:])


def test_one_network_serves_policy_and_world_model(layout, episodes):
    """The action logits and the frame decoder's logits both move when a backbone weight moves."""
    model = encoded_model(layout)
    data = EpisodeData(layout, [layout.episode(e) for e in episodes[0][:4]], [layout.episode(e) for e in episodes[1][:2]],
                       StreamConfig())
    batch = data.collate([[data.row(layout.episode(longest(episodes[0])), 400, start=0)]])
    out = model(batch["input"], slots=batch["slots"])
    kinds = layout.kinds_of(batch["target"].numpy())[0]
    act = torch.from_numpy(np.flatnonzero(kinds == 3))  # K_ACTION targets
    obs = torch.from_numpy(np.flatnonzero((kinds == 2) & (np.arange(len(kinds)) > 60)))  # next-frame targets
    block = model.backbone.blocks[0]
    grads = []
    for pos in (act, obs):
        model.zero_grad()
        out = model(batch["input"], slots=batch["slots"])
        out.logits[0, pos].logsumexp(-1).sum().backward()
        grads.append(next(block.parameters()).grad.abs().sum().item())
    assert min(grads) > 0


@pytest.mark.parametrize("backbone,film", [("transformer", False), ("mamba", False), ("transformer", True),
                                           ("transformer", "gru")])
def test_runner_matches_the_training_forward(layout, episodes, backbone, film):
    """Fed step by step through the runner (cache, chunks [a r d obs]), the policy's logits and the frame
    decoder's logits are those of one forward over the whole row (with FiLM, the runner hands the model the
    mission that the cached calls no longer hold)."""
    from worldloom.world.rollout.runner import StreamRunner

    model = encoded_model(layout, backbone=backbone, film=film)
    ep = layout.episode(longest(episodes[1]))
    T = min(ep.length, 4)
    runner = StreamRunner(model, layout)
    h = runner.reset([ep.prefix], ep.steps[:1, : layout.obs_len])
    policy = [runner.logits(h)]
    frames = []
    for t in range(T - 1):
        h_d = runner.feed(ep.steps[t : t + 1, layout.obs_len :])[:, -1]
        frames.append(runner.frame(h_d))
        h = runner.feed(ep.steps[t + 1 : t + 2, : layout.obs_len])[:, -1]
        policy.append(runner.logits(h))
    seq = torch.from_numpy(np.concatenate([ep.prefix, ep.steps[:T].reshape(-1)]))[None]
    slots = torch.zeros_like(seq)
    slots[0, len(ep.prefix):] = torch.from_numpy(layout.slots_at(0, T * layout.step_len))
    with torch.no_grad():
        full = model(seq, slots=slots).logits[0]
    P, S, L = len(ep.prefix), layout.step_len, layout.obs_len
    for t in range(T):
        want = runner.logits(torch.zeros(1, model.cfg.d_model))  # only for the restriction's shape
        got = policy[t][0]
        ref = full[P + t * S + L - 1]
        ok = torch.isfinite(got)
        torch.testing.assert_close(got[ok], ref[ok], rtol=1e-4, atol=1e-4)
        assert want.shape == policy[t].shape
    for t in range(T - 1):
        at = P + t * S + S - 1  # the d_t position predicts cell 1 of o_{t+1}, the cells after it the next ones
        ref = full[at : at + L]
        got = frames[t][0]
        ok = torch.isfinite(got)
        torch.testing.assert_close(got[ok], ref[ok], rtol=1e-4, atol=1e-4)


def test_mission_vectors_on_a_hand_made_row():
    """Two episodes packed in one row (<bos> words <sep> steps ...): each frame gets the mean embedding of its
    own episode's words; an empty mission gives zeros; a frame with no <bos> before it is refused."""
    from worldloom.modality import mission_vectors

    emb_table = torch.randn(20, 4)
    #        bos  w5  w6  sep  obs  obs  bos  sep  obs | bos  w7  sep obs
    idx = torch.tensor([[1, 5, 6, 2, 10, 11, 1, 2, 12], [1, 7, 2, 13, 0, 0, 0, 0, 0]])
    slots = torch.tensor([[0, 0, 0, 0, 1, 2, 0, 0, 1], [0, 0, 0, 1, 2, 0, 0, 0, 0]])
    at = torch.tensor([4, 8, 9 + 3])
    got = mission_vectors(emb_table[idx], idx, slots, at, bos=1, first_word=3)
    torch.testing.assert_close(got[0], (emb_table[5] + emb_table[6]) / 2)
    torch.testing.assert_close(got[1], torch.zeros(4))
    torch.testing.assert_close(got[2], emb_table[7])
    with pytest.raises(ValueError, match="mission prefix"):
        mission_vectors(emb_table[idx[:, 3:]], idx[:, 3:], slots[:, 3:], torch.tensor([1]), bos=1, first_word=3)


def test_film_conditions_the_frame_on_the_mission(layout, episodes):
    """With FiLM the policy's logits at the first observation depend on the mission through the frame
    encoder too: swapping the mission words changes the frame vectors; a cached call without the mission
    is refused in one line rather than silently unconditioned."""
    ep = layout.episode(longest(episodes[1]))
    other = next(layout.episode(e) for e in episodes[0] if e.mission != longest(episodes[1]).mission)
    seq = [torch.from_numpy(np.concatenate([p, ep.steps[0, : layout.obs_len]]))[None] for p in (ep.prefix, other.prefix)]
    outs = {}
    for film in (False, True, "gru"):
        model = encoded_model(layout, film=film)
        seen = []
        model.obs_encoder.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        for s in seq:
            slots = torch.zeros_like(s)
            slots[0, -layout.obs_len:] = torch.arange(1, layout.obs_len + 1)
            with torch.no_grad():
                model(s, slots=slots)
        outs[film] = seen
    torch.testing.assert_close(outs[False][0], outs[False][1])
    assert not torch.allclose(outs[True][0], outs[True][1])
    assert not torch.allclose(outs["gru"][0], outs["gru"][1])
    model = encoded_model(layout, film=True)
    obs = torch.from_numpy(ep.steps[:1, : layout.obs_len])
    with pytest.raises(ValueError, match="mission"):
        model(obs, slots=torch.arange(1, layout.obs_len + 1)[None])


@pytest.mark.parametrize("backbone,where", [("transformer", "all"), ("mamba", "all"), ("transformer", "policy")])
def test_mission_vector_runner_matches_the_training_forward(layout, episodes, backbone, where):
    """stream.mission_vec (token stream): the runner's cached calls (which hold no prefix) get the rows'
    missions and reproduce the full forward's policy logits; the mission moves them; a cached call
    without it is refused."""
    cfg = build_config(None, [*TINY_WORLD, f"model.backbone={backbone}", "model.context=256"]).model
    cfg.vocab_size, cfg.slots, cfg.mission_vec = layout.vocab_size, layout.n_slots, where
    torch.manual_seed(0)
    model = LWM(cfg).eval()
    ep = layout.episode(longest(episodes[1]))
    L = layout.obs_len
    seq, slots, skip, full, P = runner_matches_forward(model, layout, ep)
    with torch.no_grad():
        other = seq.clone()
        other[0, 1 : P - 1] = N_WORD  # another mission, same length
        moved = model(other, slots=slots, skip=skip).logits[0]
    assert not torch.allclose(full[P + L - 1], moved[P + L - 1])
    with pytest.raises(ValueError, match="mission"):
        model(seq[:, P:], slots=slots[:, P:], skip=None if skip is None else skip[:, P:])


N_WORD = 3  # the first mission word id (N_SPECIAL): a mission of one repeated word


def test_encoded_config_errors():
    with pytest.raises(ConfigError, match="obs_film"):
        build_config(None, [*TINY_WORLD, "stream.obs_film=true"])
    with pytest.raises(ConfigError, match="mission_vec"):
        build_config(None, [*TINY_WORLD, "stream.mission_vec=every"])
    with pytest.raises(ConfigError, match="stream.obs must be"):
        build_config(None, [*TINY_WORLD, "stream.obs=pixels"])
    with pytest.raises(ConfigError, match="parallel_obs"):
        build_config(None, [*TINY_WORLD, "stream.obs=encoded", "stream.parallel_obs=true"])
    with pytest.raises(ConfigError, match="obs_vectors"):
        build_config(None, [*TINY_WORLD, "stream.obs=encoded", "stream.obs_vectors=0"])


@pytest.fixture(scope="module")
def encoded_run(tmp_path_factory, world_dataset):
    from worldloom.recipes import get_recipe

    cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={tmp_path_factory.mktemp('enc')}",
                              "name=enc", "stream.obs=encoded", "stream.obs_vectors=2"])
    get_recipe(cfg.recipe).run(cfg, progress=False, log=lambda *a: None)
    return cfg.run_dir


def test_encoded_world_run_trains_acts_and_imagines(encoded_run):
    """`worldloom train` with stream.obs=encoded: trains, evaluates (acting, teacher-forced frames, open loop,
    planning) and reports, through the same pipeline as the token stream."""
    import json

    res = json.loads((encoded_run / "eval.json").read_text())
    wm = res["world_model"]["expert"]
    assert wm["frame_n"] > 0 and wm["token_n"] == 50 * wm["frame_n"]  # the decoder's logits, read as the stream's
    assert res["real"]["episodes"] == 6 and res["open_loop"]["horizons"]["1"]["n"] > 0
    assert res["plan"]["mode"] == "parallel"
    mc = res["mission_control"]  # the same 6 seeds again, each given another level's mission
    assert mc["episodes"] == 6 and mc["own"] == res["real"]["success"] and 0.0 <= mc["other"] <= 1.0
    assert "another level's" in (encoded_run / "report.md").read_text()
    mr = res["mission_reading"]  # the held-out expert actions behind their own and another episode's mission
    assert mr["episodes"] == 12 and mr["same_mission"] < 12
    assert mr["own"]["all"]["n"] == mr["other"]["all"]["n"] == sum(v["n"] for k, v in mr["own"].items() if k != "all")
    assert mr["own"]["all"]["nll"] != mr["other"]["all"]["nll"] and "Mission read" in (encoded_run / "report.md").read_text()
    from worldloom.run import load_world_run

    run = load_world_run(encoded_run)
    assert run.model.cfg.obs_vectors == 2 and run.model.obs_encoder is not None


def test_encoded_rows_fill_the_context_in_model_positions(layout, episodes):
    """Rows are packed by model positions (obs_vectors + 3 per step) and cut at whole steps: each row's
    backbone length stays within the context and is near it; the ids run far past it."""
    cost = 2 + layout.step_len - layout.obs_len
    data = EpisodeData(layout, [layout.episode(e) for e in episodes[0]], [layout.episode(e) for e in episodes[1]],
                       StreamConfig(), step_cost=cost)
    context = 200
    batch = data.batch("train", 6, context, torch.Generator().manual_seed(0))
    plan = FramePlan.build(batch["slots"], layout.obs_len, layout.step_len, 2, batch["input"])
    lengths = [int(plan.back[b].max()) + 1 for b in range(6)]
    assert max(lengths) <= context and min(lengths) > context - cost - 20  # a prefix + a step may not fit at the end
    assert batch["input"].shape[1] > 3 * context
    starts = batch["slots"] == 1
    ends = torch.nonzero(batch["slots"] == layout.step_len)
    assert int(starts.sum()) == len(ends) + 6  # whole steps only (each row's last d is a target, not an input)


def test_ppo_scores_what_the_runner_showed_an_encoded_policy(layout, episodes):
    """The RL stage's stream windows, counted in model positions, reproduce the runner's roll-over."""
    from worldloom.world import rl as wrl
    from worldloom.world.rollout.agent import EpisodeResult
    from worldloom.world.rollout.runner import StreamRunner

    model = encoded_model(layout, context=40)
    ep = longest(episodes[0])
    tok = layout.episode(ep)
    cost = 2 + layout.step_len - layout.obs_len
    assert len(wrl.windows(len(tok.prefix), tok.length, cost, 40, 2)) > 1, "need a rolled-over episode"
    ro = wrl.build_rollout(layout, [EpisodeResult(ep.seed, True, 1.0, ep.length, ep)], 40, cost, 2)
    sc = wrl.score(model, model, wrl.ValueHead(model.cfg.d_model), layout, ro, wrl.RLConfig())
    runner = StreamRunner(model, layout)
    h = runner.reset([tok.prefix], tok.steps[:1, : layout.obs_len])
    lo, want = layout.offset["action"], []
    for t in range(tok.length):
        want.append(float(torch.log_softmax(runner.logits(h)[0, lo : lo + layout.n_actions], -1)[ep.action[t]]))
        if t + 1 < tok.length:
            h = runner.feed(np.concatenate([tok.steps[t, layout.obs_len :], tok.steps[t + 1, : layout.obs_len]])[None])[:, -1]
    assert runner.rebuilds > 0
    assert np.allclose(sc.old_logp.numpy(), want, atol=1e-4), np.round(sc.old_logp.numpy() - np.array(want), 4)


def test_tune_ppo_on_an_encoded_run(encoded_run, tmp_path):
    import json

    from worldloom.world import rl as wrl

    wrl.tune(encoded_run, ["rl.updates=1", "rl.envs=2", "rl.episodes=2", "rl.epochs=1", "rl.value_warmup=0",
                           f"out_dir={tmp_path}", "name=ppo"], progress=False, log=lambda *a: None)
    row = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["episodes"] == 2 and row["kl"] == 0.0


def test_frame_decoder_forward_is_the_torch_layers():
    """The decoder's written-out forward (plain matmul attention) computes what its nn.TransformerEncoder
    layers compute, so its checkpoints mean the same thing."""
    torch.manual_seed(0)
    dec = FrameDecoder(d_model=16, obs_len=50, n_layer=2, n_head=4, d_ff=32).eval()
    h, prev = torch.randn(5, 16), torch.randn(5, 50, 16)
    with torch.no_grad():
        ref = dec.layers(prev + dec.query + dec.cond(h).unsqueeze(1))
        got = dec(h, prev)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_mission_words_on_a_hand_made_row():
    """The GRU's input: each position's episode words, in order (two episodes packed in one row, an empty
    mission, a second row); a frame with no <bos> before it is refused."""
    from worldloom.modality import mission_words

    #                  bos w5 w6 sep obs obs bos sep obs | bos w7 w8 w9 sep obs
    idx = torch.tensor([[1, 5, 6, 2, 10, 11, 1, 2, 12], [1, 7, 8, 9, 2, 13, 0, 0, 0]])
    slots = torch.tensor([[0, 0, 0, 0, 1, 2, 0, 0, 1], [0, 0, 0, 0, 0, 1, 0, 0, 0]])
    words, lengths, which = mission_words(idx, slots, torch.tensor([4, 8, 9 + 5]), bos=1, first_word=3)
    assert words.tolist() == [[5, 6, 0], [7, 8, 9]] and lengths.tolist() == [2, 3]
    assert which.tolist() == [0, -1, 1]
    with pytest.raises(ValueError, match="mission prefix"):
        mission_words(idx[:, 3:], slots[:, 3:], torch.tensor([1]), bos=1, first_word=3)


def test_gru_mission_reads_word_order(layout, episodes):
    """mission_encoder=gru: the same words in another order give another mission vector (the mean cannot
    tell them apart), and the batched cached path (left-padded prefixes) gives each row its own words' vector."""
    model = encoded_model(layout, film="gru")
    ep = layout.episode(longest(episodes[1]))
    P = len(ep.prefix)
    swapped = ep.prefix.copy()
    swapped[1 : P - 1] = swapped[1 : P - 1][::-1]
    vecs = []
    for prefix in (ep.prefix, swapped):
        idx = torch.from_numpy(np.concatenate([prefix, ep.steps[0, : layout.obs_len]]))[None]
        slots = torch.zeros_like(idx)
        slots[0, P:] = torch.arange(1, layout.obs_len + 1)
        with torch.no_grad():
            vecs.append(model._mission_of(model.embed(idx), idx, slots, None)[0, -1])
    assert not torch.allclose(vecs[0], vecs[1])
    short = np.array([ep.prefix[0], ep.prefix[1], ep.prefix[-1]])  # <bos> one word <sep>
    rows = torch.tensor([list(ep.prefix), [0] * (P - 3) + list(short)])  # left padded
    obs = torch.from_numpy(np.stack([ep.steps[0, :2]] * 2))
    with torch.no_grad():
        got = model._mission_of(model.embed(obs), obs, torch.ones_like(obs), rows)
        one = model._mission_of(model.embed(obs[:1]), obs[:1], torch.ones_like(obs[:1]), torch.from_numpy(short)[None])
    torch.testing.assert_close(got[0, 0], vecs[0])
    torch.testing.assert_close(got[1, 1], one[0, 0])


def test_mission_reading_needs_two_missions_and_scores_every_action(layout, episodes):
    """Episodes that all share one mission give None (nothing to swap); otherwise every action of each episode's
    first window is scored twice, by step, and the step rows add up to "all"."""
    import dataclasses

    from worldloom.world.eval.metrics import mission_reading

    model = encoded_model(layout, film=True)
    val = episodes[1][:6]
    assert mission_reading(model, layout, [dataclasses.replace(e, mission="go to the red ball") for e in val], 256) is None
    res = mission_reading(model, layout, val, 256)
    assert set(res["own"]) == set(res["other"]) and "0" in res["own"] and "all" in res["own"]
    assert res["own"]["all"]["n"] == sum(v["n"] for k, v in res["own"].items() if k != "all")
    assert res["own"]["0"]["n"] == len(val)  # every episode's first action


@pytest.mark.parametrize("film", [False, True])
def test_teacher_forced_pass_gives_mission_reading_its_own_rows(layout, episodes, film):
    """evaluate_world runs the forward pass behind the own missions once: the rows teacher_forced_accuracy
    collects are those mission_reading computes itself."""
    from worldloom.world.eval.metrics import mission_reading, teacher_forced_accuracy

    model = encoded_model(layout, film=film)
    val = episodes[1][:6]
    rows: dict = {}
    with torch.no_grad():
        teacher_forced_accuracy(model, layout, [layout.episode(e) for e in val], [False] * len(val),
                                [np.zeros(e.length, bool) for e in val], 256, action_steps=rows)
        again = mission_reading(model, layout, val, 256, own=rows)
        alone = mission_reading(model, layout, val, 256)
    assert rows and again["other"] == alone["other"]
    for k, v in alone["own"].items():
        assert again["own"][k]["n"] == v["n"] and again["own"][k]["accuracy"] == v["accuracy"]
        assert abs(again["own"][k]["nll"] - v["nll"]) < 1e-5
