"""The talk model's vision prefix (worldloom.talk.prefix, talk.view=prefix): encoder and projector shapes,
rendered views, the prefix placed in the stream and through the KV cache, stage 1 freezing the backbone,
a tiny run from a base talk run through train -> resume (stage 2) -> eval -> generate, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

from worldloom.checkpoint import latest_checkpoint
from worldloom.cli import main
from worldloom.config import ModelConfig, PrefixConfig, StreamConfig, TalkConfig
from worldloom.io import load_tensors
from worldloom.model import LWM
from worldloom.talk.prefix import StageFreeze, ViewRenderer, VisionPrefix, attach_prefix
from worldloom.talk.stream import TalkData, TalkEpisode
from worldloom.talk.text import vocabulary
from worldloom.tokenize import GridTokenizer
from worldloom.world.stream import PAD, StreamLayout

from conftest import WORLD_ENV

SMALL = PrefixConfig(tile=4, grid=7, channels=8, hidden=16)


def view(*cells) -> np.ndarray:
    """A 7x7 view of floor, a wall across the far row, and (object, colour, i, j) cells."""
    image = np.zeros((7, 7, 3), np.uint8)
    image[..., 0] = OBJECT_TO_IDX["empty"]
    image[:, 0, :2] = (OBJECT_TO_IDX["wall"], COLOR_TO_IDX["grey"])
    for obj, colour, i, j in cells:
        image[i, j] = (OBJECT_TO_IDX[obj], COLOR_TO_IDX[colour], 0)
    return image


RED_BALL, BLUE_KEY = view(("ball", "red", 2, 4)), view(("key", "blue", 3, 5))


def test_encoder_and_projector_shapes():
    images = torch.from_numpy(ViewRenderer(WORLD_ENV, 4)(np.stack([RED_BALL, BLUE_KEY, RED_BALL])))
    assert images.shape == (3, 28, 28, 3) and images.dtype == torch.uint8
    assert not torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])
    assert VisionPrefix(7, SMALL, 32)(images).shape == (3, 49, 32)  # one vector per cell, in d_model
    pooled = VisionPrefix(7, PrefixConfig(tile=4, grid=3, channels=8, hidden=16), 24)
    assert pooled(images).shape == (3, 9, 24) and pooled.vectors == 9
    with pytest.raises(ValueError, match="reads 28x28x3 views"):
        VisionPrefix(7, SMALL, 32)(torch.zeros(1, 56, 56, 3, dtype=torch.uint8))  # a view of another size


@pytest.fixture(scope="module")
def setup():
    """A stream layout, a tiny LWM with a vision prefix, and talk data whose read segments show it."""
    layout = StreamLayout.build(["go to the red ball", vocabulary()], 7, StreamConfig(), GridTokenizer())
    images = np.stack([RED_BALL, BLUE_KEY])
    obs = layout.encode_obs({"image": images, "direction": np.array([0, 0])})
    steps = np.concatenate([obs, layout.action_ids([2, 2])[:, None], layout.reward_ids([0, 0])[:, None],
                            layout.done_ids([False, True], [False, False])[:, None]], axis=1)
    ep = TalkEpisode(layout.prefix("go to the red ball"), steps, layout.action_ids([2, 2]), images=images,
                     mission="go to the red ball")
    data = TalkData(layout, [ep], [ep], StreamConfig(), TalkConfig(fraction=1.0, draw=0.0), vectors=49,
                    render=ViewRenderer(WORLD_ENV, SMALL.tile))
    cfg = ModelConfig(vocab_size=layout.vocab_size, n_layer=1, n_head=2, d_model=32, context=256, slots=layout.n_slots)
    torch.manual_seed(0)
    model = LWM(cfg)
    attach_prefix(model, type("Cfg", (), {"prefix": SMALL, "model": cfg})(), 7)
    return layout, data, model


def test_read_segments_hold_placeholders_the_prefix_fills(setup):
    layout, data, model = setup
    batch = data.batch("train", 3, 256, torch.Generator().manual_seed(0))
    at, views = batch["prefix_at"], batch["prefix_views"]
    assert at.sum() == 49 * len(views) and len(views) >= 3 and views.shape[1:] == (28, 28, 3)
    assert (batch["input"][at] == PAD).all() and (batch["weight"][at] == 0).all()  # placeholders, never targets
    out = model(**{k: batch[k] for k in ("slots", "prefix_views", "prefix_at")}, idx=batch["input"])
    swapped = dict(batch, prefix_views=views.flip(0))  # other images: other logits after the prefix, same before it
    out2 = model(**{k: swapped[k] for k in ("slots", "prefix_views", "prefix_at")}, idx=batch["input"])
    first = int(at[0].nonzero()[0])
    assert torch.allclose(out.logits[0, :first], out2.logits[0, :first])
    if not torch.equal(views[0], views.flip(0)[0]):
        assert not torch.allclose(out.logits[0, first:], out2.logits[0, first:])
    # a row cut inside a prefix leaves it out
    seq, P, seg = data.talk_segment(data.splits["train"][0], torch.Generator().manual_seed(1))
    cut = data.collate([[(seq, P, seg)]], length=P + 10)
    assert not cut["prefix_at"].any() and len(cut["prefix_views"]) == 0


def test_prefix_goes_through_the_kv_cache(setup):
    layout, data, model = setup
    from worldloom.talk.stream import read_prompt

    ids, slots = read_prompt(layout, "go to the red ball", None, "caption:", vectors=49)
    P = len(layout.prefix("go to the red ball"))
    at = torch.zeros(1, len(ids), dtype=torch.bool)
    at[0, P: P + 49] = True
    img = torch.from_numpy(ViewRenderer(WORLD_ENV, SMALL.tile)(RED_BALL[None]))
    idx, sl = torch.from_numpy(ids)[None], torch.from_numpy(slots)[None]
    with torch.no_grad():
        full = model(idx, slots=sl, prefix_views=img, prefix_at=at).logits[0, -1]
        cache = model.new_cache(1, 256)
        model(idx[:, :-1], cache, sl[:, :-1], prefix_views=img, prefix_at=at[:, :-1])
        step = model(idx[:, -1:], cache, sl[:, -1:]).logits[0, -1]  # the prefix is in the cache
    assert torch.allclose(full, step, atol=1e-5)


def test_talk_model_reads_left_padded_prefix_prompts_as_alone(setup):
    from worldloom.talk.generate import TalkModel

    layout, data, model = setup
    tm = TalkModel(model, layout, render=ViewRenderer(WORLD_ENV, SMALL.tile))
    firsts = []  # the logits after each prompt (its first call)
    call = tm._call
    tm._call = lambda ids, slots, cache, prefix=None: firsts.append(call(ids, slots, cache, prefix)) or firsts[-1]

    def first_logits(missions, images):
        firsts.clear()
        tm.read(missions, np.zeros((len(missions), layout.obs_len), np.int64), ["caption:"] * len(missions), 2, images)
        return firsts[0]

    missions, images = ["go to the red ball", "go to the ball"], np.stack([RED_BALL, BLUE_KEY])  # prompts of two lengths
    both = first_logits(missions, images)
    alone = torch.cat([first_logits(missions[i:i + 1], images[i:i + 1]) for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)
    assert not torch.allclose(alone[:1], first_logits(missions[:1], images[1:]), atol=1e-5)  # the view matters
    with pytest.raises(ValueError, match="reads views as a vision prefix"):
        tm.read(missions, np.zeros((2, layout.obs_len), np.int64), ["caption:"] * 2)


def test_stage_one_freezes_the_backbone_and_stage_two_does_not(setup):
    layout, data, model = setup
    freeze = StageFreeze(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = data.batch("train", 2, 256, torch.Generator().manual_seed(0))
    inputs = {k: batch[k] for k in ("slots", "prefix_views", "prefix_at")}

    def step():
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = model(batch["input"], **inputs)
        torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["target"].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    try:
        freeze.frozen = True
        changed = step()
        assert changed and all(k.startswith("vision_prefix.") for k in changed)  # weight decay too left the rest
        assert "vision_prefix.encoder.stem.weight" in changed and "vision_prefix.projector.2.weight" in changed
        freeze.frozen = False
        changed = step()
        assert "backbone.blocks.0.attn.qkv.weight" in changed or any(k.startswith("backbone.") for k in changed)
        assert "embed.weight" in changed
    finally:
        for h in freeze.handles:
            h.remove()


TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=384", "train.batch_size=3",
        "train.max_minutes=0", "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=1",
        "train.warmup_steps=1", "train.precision=fp32", "train.device=cpu", "train.threads=1", "eval.envs=1",
        "talk.eval_views=2"]
SMALL_ARGS = ["prefix.tile=4", "prefix.channels=8", "prefix.hidden=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world_dataset):
    """A tiny token talk run (the base), and a prefix run from it trained 2 steps, all of them stage 1."""
    from worldloom.config import build_config
    from worldloom.train import train

    out = tmp_path_factory.mktemp("prefix")
    common = [*TINY, f"data.path={world_dataset}", f"out_dir={out}", "train.max_steps=2"]
    train(build_config("babyai-talk", [*common, "name=base"]), progress=False, log=lambda *a: None)
    train(build_config("babyai-talk-prefix", [*common, *SMALL_ARGS, "prefix.stage1_steps=2", f"prefix.base={out / 'base'}",
                                              "name=prefix"]), progress=False, log=lambda *a: None)
    return out / "base", out / "prefix"


def weights(run):
    return load_tensors(latest_checkpoint(run) / "model.safetensors")


def test_stage_one_from_a_base_run_then_resume_into_stage_two(runs, capsys):
    from worldloom.train import train

    base, prefix = runs
    b, p = weights(base), weights(prefix)
    own = [k for k in p if k.startswith("vision_prefix.")]
    assert own and set(p) - set(own) == set(b)  # the encoder and projector saved with the model
    assert all(torch.equal(p[k], b[k]) for k in b)  # stage 1: the backbone is the base's, to the bit
    train(resume=prefix, overrides=["train.max_steps=4"], progress=False, log=lambda *a: None)
    p4 = weights(prefix)
    assert any(not torch.equal(p4[k], b[k]) for k in b)  # stage 2 (after the resume): the backbone learns too
    assert any(not torch.equal(p4[k], p[k]) for k in own)
    capsys.readouterr()
    assert main(["eval", str(prefix), "--json", "--episodes", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 4 and res["views"]["n_views"] == 2 and res["views"]["n_questions"] > 0
    assert set(res["views"]) >= {"caption_attr", "caption_exact", "qa", "draw_attr"}
    assert main(["generate", str(prefix), "--view", "seed=3", "Q: what is in front of you? A:", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Q: what is in front of you? A:")


@pytest.mark.parametrize("args, message", [
    (["babyai", "prefix.grid=3"], "prefix.* settings are for a talk run with talk.view=prefix; a world run"),
    (["babyai", "talk.view=prefix"], "talk.view=prefix is for a talk run"),
    (["babyai-talk", "prefix.channels=32"], "a talk run with talk.view=tokens has no vision prefix"),
    (["babyai-talk-prefix", "prefix.stage1_steps=5"], "without prefix.base is its random init"),
    (["babyai-talk-prefix", "talk.view=pixels"], "talk.view must be tokens or prefix"),
])
def test_prefix_settings_elsewhere_are_one_line(tmp_path, capsys, args, message):
    assert main(["train", *args, f"out_dir={tmp_path}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["prefix.grid=9"], "prefix.grid=9 asks for more vectors per side than the view has cells (7)"),
    (["prefix.base={base}/stream"], "prefix.base: "),
    (["prefix.base={prefix}"], "is a talk run (talk.view=prefix)"),
    (["prefix.base={base}", "stream.step_skip=false"], "has stream.step_skip=True"),
])
def test_bad_view_sizes_and_bases_are_one_line(runs, world_dataset, tmp_path, capsys, args, message):
    base, prefix = runs
    args = [a.format(base=base, prefix=prefix) for a in args]
    assert main(["train", "babyai-talk-prefix", *TINY, "train.max_steps=1", *args, f"data.path={world_dataset}",
                 f"out_dir={tmp_path}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
