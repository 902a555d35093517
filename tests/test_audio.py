"""Speech as tokens (issue 16, requirement 7): log-mel frames and Griffin-Lim, espeak-ng speech, the mel
autoencoder with vision's VQ, the audio tokenizer's protocol, and the audio-tokenizer recipe end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from worldloom.audio.mel import SILENCE, MelSpec, mel_filterbank
from worldloom.audio.speech import LANGUAGES, VARIANTS, SpeechError, Voice, draw_voice, missions, read_wav, speak, wav_bytes
from worldloom.config import AudioConfig, build_config
from worldloom.errors import ConfigError

from test_checkpoint_errors import cli_error

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
SMALL = AudioConfig(n_mels=32, channels=16, codebook=32, code_dim=8, crop=32, griffin_lim=16)

# ---------------------------------------------------------------- mel frames and Griffin-Lim


def test_filterbank_triangles_peak_at_one_and_rise_in_frequency():
    fb = mel_filterbank(22050, 1024, 40, 8000.0)
    assert fb.shape == (40, 513) and fb.min() >= 0
    assert (fb.max(1) > 0.8).all() and (fb.max(1) <= 1).all()  # each triangle peaks near 1 (its centre between bins)
    assert (np.diff(fb.argmax(1)) >= 0).all() and fb[:, 513 * 8000 // 11025 + 2:].sum() == 0  # nothing above fmax


def tone(freq: float, seconds: float = 0.5, rate: int = 22050) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_logmel_of_a_tone_peaks_at_its_band_and_silence_is_the_floor():
    spec = MelSpec(SMALL)
    low, high = spec.logmel(tone(300.0)), spec.logmel(tone(3000.0))
    assert low.shape == (len(tone(300.0)) // SMALL.hop + 1, 32)
    band = lambda f: int(np.abs(spec.fb.numpy().argmax(1) * 22050 / 1024 - f).argmin())  # noqa: E731
    assert abs(int(np.median(low.argmax(1))) - band(300.0)) <= 1 and abs(int(np.median(high.argmax(1))) - band(3000.0)) <= 1
    assert np.allclose(spec.logmel(np.zeros(4000, np.float32)), SILENCE)


def test_griffin_lim_rebuilds_a_signal_whose_mel_matches():
    rate = 22050
    t = np.arange(rate // 2) / rate
    voiced = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 12)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    ac = AudioConfig()
    spec = MelSpec(ac)
    target = spec.logmel((0.2 * voiced).astype(np.float32))
    loud = target > target.max() - 6  # where the sound is (the floor is not comparable after peak-normalising)
    err, corr = {}, {}
    for iters in (1, 32):
        spec.iters = iters
        wave = spec.griffin_lim(target)
        assert abs(len(wave) - rate // 2) <= ac.hop and np.abs(wave).max() == pytest.approx(0.9, abs=1e-3)
        got = spec.logmel(wave)[:len(target)]
        err[iters] = np.abs((got - got[loud].mean()) - (target - target[loud].mean()))[loud].mean()
        corr[iters] = np.corrcoef(got[loud], target[loud])[0, 1]
    assert err[32] < 0.85 * err[1] and corr[32] > 0.88  # the iterations make the phase consistent


def test_wav_bytes_round_trip(tmp_path):
    x = tone(440.0, 0.1)
    (tmp_path / "a.wav").write_bytes(wav_bytes(x, 16000))
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and np.abs(y - x).max() < 1e-4

# ---------------------------------------------------------------- speech


def test_missions_are_gotolocal_grammar_and_voices_respect_the_held_out_set():
    m = missions()
    assert len(m) == len(set(m)) == 36 and "go to the red ball" in m and "go to a grey key" in m
    rng = np.random.default_rng(0)
    held = {"en-029", "f4"}
    train = [draw_voice(rng, held) for _ in range(200)]
    other = [draw_voice(rng, held, held=True) for _ in range(50)]
    assert not any(v.is_held(held) for v in train) and all(v.is_held(held) for v in other)
    assert len({v.name for v in train}) > 20 and len({v.speed for v in train}) > 20
    with pytest.raises(SpeechError, match="no training voice"):
        draw_voice(rng, set(LANGUAGES))
    assert len(VARIANTS) == 11


def test_missing_espeak_is_one_actionable_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SpeechError, match=r"apt-get install espeak-ng"):
        speak("go to the red ball")


@needs_espeak
def test_speak_gives_speech_that_voices_and_speeds_change():
    slow = speak("go to the red ball", Voice("en-us", "m1", 130, 50))
    fast = speak("go to the red ball", Voice("en-us", "m1", 200, 50))
    high = speak("go to the red ball", Voice("en-gb", "f2", 130, 80))
    assert slow.dtype == np.float32 and 0.05 < np.abs(slow).max() <= 1.0
    assert len(fast) < 0.85 * len(slow)  # faster speech is shorter
    assert len(high) != len(slow) or not np.allclose(high[:1000], slow[:1000])
    assert len(speak("go to the red ball", Voice("en-us", "m1", 130, 50), rate=16000)) == pytest.approx(len(slow) * 16000 / 22050, abs=2)

# ---------------------------------------------------------------- the mel autoencoder and the tokenizer


def test_autoencoder_shapes_codes_and_refusals():
    from worldloom.audio.autoencoder import MelAutoencoder

    torch.manual_seed(0)
    model = MelAutoencoder(SMALL).eval()  # in training mode every forward moves the EMA codebook
    mel = torch.randn(3, 32, 32) - 3
    out = model(mel)
    assert out.recon.shape == out.target.shape == (3, 32, 32) and out.codes.shape == (3, 8)
    codes = model.encode(mel)
    assert torch.equal(codes, out.codes) and model.decode(codes).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 30, 32))


def test_audio_tokenizer_protocol_and_save_load(tmp_path):
    from worldloom.audio.autoencoder import MelAutoencoder
    from worldloom.audio.tokenizer import AudioTokenizer
    from worldloom.tokenize.base import ObsTokenizer, load_obs_tokenizer

    torch.manual_seed(0)
    tok = AudioTokenizer(MelAutoencoder(SMALL))
    assert isinstance(tok, ObsTokenizer) and tok.n_tokens == 8 and tok.token_ranges() == [(0, 32)] * 8
    clips = np.random.default_rng(0).normal(-3, 2, (2, 32, 32)).astype(np.float32)
    ids = tok.encode_batch({"mel": clips})
    assert ids.shape == (2, 8) and ids.dtype == np.int64
    assert tok.decode_batch(ids)["mel"].shape == (2, 32, 32)
    one = tok.encode(clips[0][:30])  # any length: padded with silence to a multiple of stack
    assert one.shape == (8,) and tok.decode(one).shape == (32, 32)
    assert tok.wave(one).shape == ((32 - 1) * SMALL.hop,)
    tok.save(tmp_path / "t")
    back = load_obs_tokenizer("audio", tmp_path / "t")
    assert np.array_equal(back.encode_batch({"mel": clips}), ids) and back.cfg == tok.cfg
    with pytest.raises(ValueError, match=r"\(N, 32, 32\) log-mel clips"):
        tok.encode_batch({"mel": clips[:, :16]})

# ---------------------------------------------------------------- the recipe


TINY = ["audio.utterances=24", "audio.val_utterances=4", "audio.n_mels=32", "audio.channels=32", "audio.codebook=32",
        "audio.code_dim=8", "audio.griffin_lim=4", "train.batch_size=16", "train.max_steps=40", "train.eval_interval=20",
        "train.log_interval=10", "train.max_minutes=0", "train.warmup_steps=5", "train.lr=0.003", "train.threads=1"]


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory):
    """One tiny audio-tokenizer run, trained once for the recipe tests of this module."""
    from worldloom.cli import main

    out = tmp_path_factory.mktemp("audio")
    assert main(["train", "tokenizer-audio", "--no-progress", f"out_dir={out}", "name=tok", *TINY]) == 0
    return out / "tok"


@needs_espeak
def test_train_eval_and_refusals(tok_run, capsys):
    from worldloom.audio.speech import read_wav
    from worldloom.audio.tokenizer import AudioTokenizer
    from worldloom.audio.utterances import load_utterances
    from worldloom.cli import main

    run = tok_run
    for f in ("speech/train.npz", "speech/val.npz", "speech/voices.npz", "reconstructions/0-codes.wav", "loss.png"):
        assert (run / f).is_file(), f
    voices = load_utterances(run / "speech" / "voices.npz")
    assert all(v.startswith("en-029+") or v.endswith("+f4") for v in voices["voice"])
    assert not any(v.startswith("en-029+") or v.endswith("+f4") for v in load_utterances(run / "speech" / "train.npz")["voice"])
    assert read_wav(run / "reconstructions" / "0-codes.wav")[1] == 22050
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for split in ("val", "voices"):  # 40 steps already keep far more than a mean frame does
        assert res[split]["utterances"] == 4 and res[split]["mse"] < 0.6 * res[split]["baseline_mse"]
    tok = AudioTokenizer.from_run(run)
    assert tok.vocab_size == 32 and tok.cfg.n_mels == 32
    line = cli_error(capsys, ["generate", str(run), "hello"])
    assert "audio-tokenizer run" in line

# ---------------------------------------------------------------- listening and speaking (recipe listen)


def test_listen_rows_weigh_only_the_answer():
    from worldloom.audio.listen import ListenVocab, pack_rows

    v = ListenVocab.for_missions(10)
    assert v.words == ("a", "ball", "blue", "box", "go", "green", "grey", "key", "purple", "red", "the", "to", "yellow")
    assert v.size == 10 + 4 + 13 and v.decode_text(v.encode_text("go to the red ball")) == "go to the red ball"
    hear, p = v.hear_row([3, 4, 5], "go to a key")
    assert hear == [v.bos, 3, 4, 5, v.hear, *v.encode_text("go to a key"), v.eos] and p == 5
    b = pack_rows([(hear, p), v.say_row([7], "go to a key")], 12, v.eos)
    assert b["input"].shape == b["target"].shape == b["weight"].shape == (2, 12)
    assert b["weight"][0].tolist() == [0] * 4 + [1] * 5 + [0] * 3  # targets: 4 words + <eos>
    assert b["target"][0, 4:9].tolist() == [*v.encode_text("go to a key"), v.eos]
    assert b["weight"][1].tolist() == [0] * 5 + [1] * 2 + [0] * 5 and b["target"][1, 5:7].tolist() == [7, v.eos]
    with pytest.raises(Exception, match="'pink' is not a word"):
        v.encode_text("go to the pink ball")


class Scripted(torch.nn.Module):
    """A 'model' whose next token is fixed by the current one (a lookup table), for greedy decoding."""

    def __init__(self, table: dict[int, int], vocab: int, context: int = 64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.cfg = type("C", (), {"vocab_size": vocab, "context": context})()
        self.table = torch.full((vocab,), 0, dtype=torch.long)
        for a, b in table.items():
            self.table[a] = b

    def forward(self, idx):
        logits = torch.nn.functional.one_hot(self.table[idx], self.cfg.vocab_size).float() * 5
        logits[..., 1] += 4  # a strong favourite outside [lo, hi): must be masked away
        return type("O", (), {"logits": logits})()


def test_greedy_follows_the_model_inside_the_allowed_ids_and_stops_at_eos():
    from worldloom.audio.listen import greedy

    m = Scripted({9: 4, 4: 5, 5: 3, 7: 6, 6: 6}, vocab=10, context=12)  # 3 is <eos>
    out = greedy(m, [[0, 9], [2, 2, 7], [9]], lo=4, hi=9, eos=3, max_new=20)
    assert out[0] == [4, 5] and out[2] == [4, 5]  # 9 -> 4 -> 5 -> <eos>
    assert out[1] == [6] * 9  # never ends: cut at the context (3 + 9 = 12)


@needs_espeak
def test_listen_trains_evaluates_and_is_refused_by_text_verbs(tok_run, tmp_path, capsys):
    from worldloom.cli import main

    args = ["train", "babyai-audio", "--no-progress", f"out_dir={tmp_path}", "name=hear", f"audio.tokenizer={tok_run}",
            "audio.eval_utterances=3", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=56", "train.max_steps=6",
            "train.eval_interval=3", "train.log_interval=2", "train.batch_size=8", "train.threads=1", "audio.griffin_lim=2"]
    assert main(args) == 0
    run = tmp_path / "hear"
    res = json.loads((run / "eval.json").read_text())
    assert res["val"]["utterances"] == 3 and res["voices"]["utterances"] == 3 and 0 <= res["voices"]["exact"] <= 1
    assert res["speak"]["missions"] == 3 and len(list((run / "spoken").glob("*.wav"))) == 3
    assert all(e["voice"].startswith("en-029+") or e["voice"].endswith("+f4") for e in res["voices"]["examples"])
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_hear" in r and "loss_say" in r for r in logged)  # batch_size 8 at speak 0.5: both kinds, almost surely
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val"] == res["val"]
    assert "listen run" in cli_error(capsys, ["generate", str(run), "go to"])
    assert "audio.tokenizer=" in cli_error(capsys, [*args[:4], "name=x", f"audio.tokenizer={tmp_path / 'none'}"])


def test_audio_config_errors():
    for bad, msg in [("audio.stack=3", "power of 2"), ("audio.crop=30", "multiple"), ("audio.n_fft=1000", "power of 2"),
                     ("audio.codebok=5", "did you mean 'audio.codebook'"), ("audio.utterances=0", "1..10")]:
        with pytest.raises(ConfigError, match=msg):
            build_config("tokenizer-audio", [bad])
