"""Image tokenizers (issue 16, part 1): quantisers, the autoencoder, the observation-tokenizer
protocol, pixel environments, the MiniGrid cell checker, and the image-tokenizer recipe end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worldloom.config import VisionConfig, build_config
from worldloom.errors import ConfigError, EnvError
from worldloom.tokenize.base import OBS_TOKENIZERS, ObsTokenizer
from worldloom.vision import EMAQuantizer, FSQuantizer, ImageAutoencoder, ImageTokenizer
from worldloom.vision.cells import CellReader, cell_labels
from worldloom.vision.frames import collect_frames, load_frames, save_frames
from worldloom.world.envs import make_adapter

from test_checkpoint_errors import cli_error

RGB = "rgb:BabyAI-GoToLocal-v0"

# ---------------------------------------------------------------- quantisers


def test_vq_takes_the_nearest_code_and_commits():
    torch.manual_seed(0)
    vq = EMAQuantizer(16, 4, beta=0.5).eval()
    z = torch.randn(50, 4, requires_grad=True)
    out = vq(z)
    brute = torch.cdist(z.detach(), vq.codebook).argmin(1)
    assert torch.equal(out.codes, brute)
    assert torch.allclose(out.q.detach(), vq.codebook[brute])
    assert out.loss.item() == pytest.approx(0.5 * ((z.detach() - vq.codebook[brute]) ** 2).mean().item(), rel=1e-5)
    out.q.sum().backward()  # straight-through: the gradient of q reaches z unchanged
    assert torch.allclose(z.grad, torch.ones_like(z))


def test_vq_ema_moves_codes_to_their_vectors_and_restarts_dead_ones():
    torch.manual_seed(0)
    vq = EMAQuantizer(8, 2, decay=0.0, dead=0.5).train()  # decay 0: a code becomes the mean of its batch vectors
    z = torch.tensor([[5.0, 5.0], [5.2, 4.8], [-5.0, -5.0]])
    vq.codebook[:] = 100.0
    vq.codebook[0] = torch.tensor([4.0, 4.0])
    vq.codebook[1] = torch.tensor([-4.0, -4.0])
    out = vq(z)
    assert out.codes.tolist() == [0, 0, 1]
    assert torch.allclose(vq.codebook[0], torch.tensor([5.1, 4.9]), atol=1e-3)
    assert torch.allclose(vq.codebook[1], torch.tensor([-5.0, -5.0]), atol=1e-3)
    assert out.stats["restarts"] == 6  # the 6 codes no vector chose were restarted at batch vectors
    rows = {tuple(r) for r in z.tolist()}
    assert all(tuple(vq.codebook[k].tolist()) in rows for k in range(2, 8))


def test_fsq_codes_are_a_bijection_onto_the_grid():
    fsq = FSQuantizer([4, 3, 5])
    assert fsq.codebook_size == 60
    every = fsq.embed(torch.arange(60))  # (60, 3): all distinct points of the grid
    assert len({tuple(r) for r in every.tolist()}) == 60
    back = fsq(torch.atanh(every.clamp(-0.99, 0.99)) * 0 + every * 3)  # any z maps onto the grid...
    assert torch.allclose(back.q, fsq.embed(back.codes))  # ...and its code embeds to the same point
    z = torch.randn(200, 3, requires_grad=True)
    out = fsq(z)
    assert out.codes.min() >= 0 and out.codes.max() < 60
    out.q.sum().backward()
    assert z.grad.abs().sum() > 0  # straight-through rounding passes gradients


# ---------------------------------------------------------------- autoencoder and tokenizer


def tiles_frames(n: int, seed: int, cells: int = 4, px: int = 8) -> np.ndarray:
    """Synthetic frames: a cells x cells grid of solid 8x8 tiles in one of 4 colours."""
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 0], [40, 40, 255]], np.uint8)
    idx = np.random.default_rng(seed).integers(0, 4, (n, cells, cells))
    return palette[idx].repeat(px, 1).repeat(px, 2), idx


def tiny_vision(**kw) -> VisionConfig:
    return VisionConfig(**{"codebook": 16, "code_dim": 8, "channels": 16, "downsample": 8, "dead_code": 0.0, **kw})  # no restarts


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_a_tiny_tokenizer_learns_to_round_trip_tiles(quantizer):
    torch.manual_seed(0)
    model = ImageAutoencoder(tiny_vision(quantizer=quantizer, fsq_levels="5,5"))
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    frames, _ = tiles_frames(512, 0)
    x = torch.from_numpy(frames)
    for step in range(150):
        out = model(x[torch.randint(0, 512, (32,))])
        loss = ((out.recon - out.target) ** 2).mean() + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    held, idx = tiles_frames(64, 1)
    tok = ImageTokenizer(model, held.shape[1:])
    ids = tok.encode_batch({"pixels": held})
    assert ids.shape == (64, 16) and tok.grid == (4, 4)
    back = tok.decode_batch(ids)["pixels"]
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 0], [40, 40, 255]], np.float32)
    means = back.reshape(64, 4, 8, 4, 8, 3).mean((2, 4))  # (64, 4, 4, 3) each tile's mean colour
    read = ((means[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    assert (read == idx).mean() >= 0.99, (read == idx).mean()
    untrained = ImageTokenizer(ImageAutoencoder(tiny_vision(quantizer=quantizer, fsq_levels="5,5")), held.shape[1:])
    means0 = untrained.decode_batch(untrained.encode_batch({"pixels": held}))["pixels"].reshape(64, 4, 8, 4, 8, 3).mean((2, 4))
    assert (((means0[..., None, :] - palette) ** 2).sum(-1).argmin(-1) == idx).mean() < 0.7  # the check can fail


def test_image_tokenizer_protocol_save_load_and_wrong_frames(tmp_path):
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageAutoencoder(tiny_vision()), (32, 32, 3), env_id="synthetic")
    assert isinstance(tok, ObsTokenizer) and OBS_TOKENIZERS["image"] is ImageTokenizer
    assert tok.n_tokens == 16 and tok.vocab_size == 16 and tok.token_ranges() == [(0, 16)] * 16
    frames, _ = tiles_frames(5, 2)
    tok.save(tmp_path / "tok")
    again = ImageTokenizer.load(tmp_path / "tok")
    assert np.array_equal(again.encode_batch({"pixels": frames}), tok.encode_batch({"pixels": frames}))
    assert np.array_equal(again.decode_batch(np.full((2, 16), 99))["pixels"], tok.decode_batch(np.full((2, 16), 15))["pixels"])
    with pytest.raises(ValueError, match=r"reads \(N, 32, 32, 3\) uint8 frames"):
        tok.encode_batch({"pixels": np.zeros((2, 64, 64, 3), np.uint8)})
    from worldloom.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds no image tokenizer"):
        ImageTokenizer.load(tmp_path)


# ---------------------------------------------------------------- pixel environments


def test_minigrid_rgb_is_the_agent_view_minigrid_draws():
    import gymnasium as gym
    from minigrid.wrappers import RGBImgPartialObsWrapper

    adapter = make_adapter(RGB)
    assert adapter.obs_fields["pixels"][0] == (56, 56, 3)
    env = adapter.make()
    obs, _ = env.reset(seed=5)
    ref = RGBImgPartialObsWrapper(gym.make("BabyAI-GoToLocal-v0"), tile_size=8)
    ref_obs, _ = ref.reset(seed=5)
    fields = adapter.observe(obs)
    assert np.array_equal(fields["pixels"], ref_obs["image"])
    assert fields["image"].shape == (7, 7, 3)  # the symbolic view is kept beside the pixels


def test_crafter_and_atari_adapters():
    crafter = make_adapter("crafter")
    env = crafter.make()
    assert env.action_space.n == 17 and crafter.n_actions == 17
    a, _ = env.reset(seed=4)
    b, _ = env.reset(seed=4)
    c, _ = env.reset(seed=5)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert "achievements" in info
    atari = make_adapter("ALE/Pong-v5")
    env = atari.make()
    spec = env.spec.kwargs
    assert spec["frameskip"] == 4 and spec["repeat_action_probability"] == 0.25
    obs, _ = env.reset(seed=0)
    assert atari.observe(obs)["pixels"].shape == (64, 64, 3) and atari.n_actions == 6
    with pytest.raises(EnvError, match="streams them through an image tokenizer"):
        atari.obs_tokenizer()


def test_pixel_episodes_go_through_the_episode_schema(tmp_path):
    from worldloom.world.data.collect import collect_dataset
    from worldloom.world.data.episodes import load_dataset

    collect_dataset(tmp_path / "d", RGB, 3, 1, workers=1, progress=False, log=lambda *a: None)
    ds = load_dataset(tmp_path / "d")
    ep = ds.episodes("train")[0]
    assert ep.obs["pixels"].shape[1:] == (56, 56, 3) and ep.obs["pixels"].dtype == np.uint8
    drawn = make_adapter(RGB).observe({"image": ep.obs["image"][0], "direction": 0})["pixels"]
    assert np.array_equal(ep.obs["pixels"][0], drawn)
    big = make_adapter(RGB).render({"pixels": drawn}, tile_size=32)  # pictures: each 8x8 cell drawn 32x32
    assert big.shape == (224, 224, 3) and np.array_equal(big[::4, ::4], drawn)


# ---------------------------------------------------------------- the cell checker


def test_cell_reader_reads_real_frames_and_catches_wrong_tiles():
    train = collect_frames(RGB, 600, 0)
    val = collect_frames(RGB, 100, 1_000_000)
    reader = CellReader(train)
    real = reader.accuracy(val["pixels"], val["image"])
    assert real["cells"] >= 1 - real["unknown_labels"] / val["image"][..., 0].size - 1e-9  # all known labels read right
    broken = val["pixels"].copy()
    broken[:, :8, :8] = 255 - broken[:, :8, :8]  # one tile per frame inverted
    hurt = reader.accuracy(broken, val["image"])
    assert hurt["cells"] <= real["cells"] - 0.9 / 49
    labels = cell_labels(val["image"])
    assert labels.shape == (100, 7, 7) and (labels[:, 6, 3] >= 1 << 24).all() and (labels[:, :6] < 1 << 24).all()


def test_frames_files_round_trip_and_refuse_garbage(tmp_path):
    frames = collect_frames("crafter", 6, 0)
    save_frames(tmp_path / "f.npz", frames)
    back = load_frames(tmp_path / "f.npz")
    assert np.array_equal(back["pixels"], frames["pixels"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    from worldloom.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a readable frames file"):
        load_frames(tmp_path / "bad.npz")
    with pytest.raises(CheckpointError, match="no pixel observations"):
        collect_frames("BabyAI-GoToLocal-v0", 2, 0)


# ---------------------------------------------------------------- the recipe end to end

TINY = ["vision.frames=96", "vision.val_frames=24", "vision.channels=8", "vision.codebook=32", "vision.code_dim=4",
        "train.batch_size=8", "train.max_steps=4", "train.eval_interval=2", "train.log_interval=1", "train.max_minutes=0"]


def test_train_eval_resume_and_refusals(tmp_path, capsys):
    from worldloom.cli import main
    from worldloom.run import load_run
    from worldloom.vision.tokenizer import ImageTokenizer

    run = tmp_path / "tok"
    assert main(["train", "tokenizer-vq", "--no-progress", f"out_dir={tmp_path}", "name=tok", *TINY]) == 0
    for f in ("reconstructions.png", "frames/train.npz", "frames/val.npz", "image_tokenizer.json", "loss.png"):
        assert (run / f).is_file(), f
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["frames"] == 24 and res["tokens_per_frame"] == 49 and 1 <= res["codes_used"] <= 32
    assert 0.0 <= res["cell_accuracy"]["cells"] <= 1.0 and res["cell_accuracy_real"]["cells"] > 0.95
    tok = ImageTokenizer.from_run(run)
    assert tok.grid == (7, 7) and tok.env_id == RGB
    before = load_frames(run / "frames" / "train.npz")["pixels"]
    assert main(["train", "--resume", str(run), "--no-progress", "train.max_steps=6"]) == 0
    assert np.array_equal(load_frames(run / "frames" / "train.npz")["pixels"], before)
    assert load_run(run, any_model=True).state["step"] == 6
    line = cli_error(capsys, ["generate", str(run), "hello"])
    assert "image-tokenizer run" in line and "worldloom eval" in line


def test_rare_colour_weights_and_the_weighted_objective():
    from worldloom.losses import image_objective
    from worldloom.vision.autoencoder import VisionOutput, colour_weights

    px = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    px[0, 0, 0] = torch.tensor([255, 0, 0])  # one red pixel among three black ones
    w = colour_weights(px, 1.0)
    # counts 1 and 3 -> raw weights 1 and 1/3, scaled to mean 1 (sum of raw weights 2, over 4 pixels)
    assert w.shape == (1, 1, 2, 2) and torch.allclose(w.flatten(), torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))
    assert torch.allclose(colour_weights(px, 0.0), torch.ones(1, 1, 2, 2))
    target = torch.zeros(1, 3, 2, 2)
    recon = target.clone()
    recon[0, :, 0, 0] = 0.5  # the red pixel wrong by 0.5 in each channel
    zero = torch.tensor(0.0)
    plain = image_objective(VisionOutput(recon, target, None, zero, {}), None)
    weighted = image_objective(VisionOutput(recon, target, None, zero, {}, w), None)
    assert plain.parts["loss"] == pytest.approx(0.25 * 3 / 12) and "weighted" not in plain.parts
    assert weighted.parts["loss"] == pytest.approx(plain.parts["loss"])  # the reported loss stays the plain MSE
    assert float(weighted.total) == pytest.approx(2.0 * 0.25 * 3 / 12)  # the rare pixel counts twice
    model = ImageAutoencoder(tiny_vision(rare_weight=0.5))
    frames = torch.from_numpy(tiles_frames(4, 0)[0])
    assert model.train()(frames).weight is not None and model.eval()(frames).weight is None
    assert ImageAutoencoder(tiny_vision()).train()(frames).weight is None
    with pytest.raises(ConfigError, match="vision.rare_weight must be in"):
        build_config("tokenizer-vq", ["vision.rare_weight=-1"])


def test_vision_config_errors(tmp_path, capsys):
    for bad, msg in [("vision.quantizer=pq", "vision.quantizer must be one of"), ("vision.fsq_levels=8,1", "fsq_levels"),
                     ("vision.downsample=3", "power of 2"), ("vision.codebok=5", "did you mean 'vision.codebook'")]:
        with pytest.raises(ConfigError, match=msg):
            build_config("tokenizer-vq", [bad])
    line = cli_error(capsys, ["train", "tokenizer-vq", "--no-progress", f"out_dir={tmp_path}", "vision.downsample=16",
                              "vision.frames=4", "vision.val_frames=2", "train.max_steps=1"])
    assert "56x56, not divisible by vision.downsample=16" in line
