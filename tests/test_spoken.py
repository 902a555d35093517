"""Following a spoken mission inside BabyAI (issue 16, requirement 7, step 3): missions as audio tokens in the
world stream (stream.spoken), their vocabulary slice, the voice per seed, saving, and the preset end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from worldloom.audio.spoken import is_spoken, voice_for
from worldloom.audio.speech import missions
from worldloom.config import AudioConfig, build_config
from worldloom.errors import ConfigError
from worldloom.tokenize import ScalarBins, TextTokenizer
from worldloom.tokenize.grid import GridTokenizer
from worldloom.world.stream import BOS, K_MISSION, SEP, StreamLayout

from conftest import TINY_WORLD

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
HELD = {"en-029", "f4"}
SMALL = AudioConfig(n_mels=32, channels=16, codebook=32, code_dim=8, crop=32, griffin_lim=4)


def audio_tokenizer():
    """An untrained tiny audio tokenizer: its codes are arbitrary, their ids and shapes are what is tested."""
    import torch

    from worldloom.audio.autoencoder import MelAutoencoder
    from worldloom.audio.tokenizer import AudioTokenizer

    torch.manual_seed(0)
    return AudioTokenizer(MelAutoencoder(SMALL))


def layouts():
    text = TextTokenizer.train("word", "\n".join(missions()))
    plain = StreamLayout(text, GridTokenizer(), 7, ScalarBins(16))
    return plain, StreamLayout(text, GridTokenizer(), 7, ScalarBins(16), audio_tokenizer())


def test_layout_ids_are_unchanged_by_the_audio_slice():
    plain, heard = layouts()
    assert "audio" not in plain.offset and plain.audio is None
    assert {k: heard.offset[k] for k in plain.offset} == plain.offset and heard.step_len == plain.step_len
    assert heard.offset["audio"] == plain.vocab_size and heard.vocab_size == plain.vocab_size + SMALL.codebook
    assert (heard.prefix("go to the red ball") == plain.prefix("go to the red ball")).all()  # no voice: the words
    assert (heard.kinds_of(np.arange(plain.vocab_size, heard.vocab_size)) == K_MISSION).all()


@needs_espeak
def test_prefix_with_a_voice_is_audio_ids_in_the_new_slice():
    plain, heard = layouts()
    a, b = voice_for(3, HELD), voice_for(4, HELD, held=True)
    p = heard.prefix("go to the red ball", a)
    lo, hi = heard.offset["audio"], heard.vocab_size
    assert p[0] == BOS and p[-1] == SEP and len(p) > 12  # ~1 s of speech at 21.5 codes a second
    assert ((p[1:-1] >= lo) & (p[1:-1] < hi)).all()
    assert (heard.prefix("go to the red ball", a) == p).all()  # the same speech, the same codes
    assert len(heard.prefix("go to the red ball", b)) != len(p) or (heard.prefix("go to the red ball", b) != p).any()
    with pytest.raises(ValueError, match="no audio tokens"):
        plain.prefix("go to the red ball", a)


def test_voice_per_seed_is_deterministic_and_respects_the_held_out_voices():
    seeds = range(300)
    train = [voice_for(s, HELD) for s in seeds]
    assert train == [voice_for(s, HELD) for s in seeds]
    assert not any(v.is_held(HELD) for v in train) and len({v.name for v in train}) > 20
    held = [voice_for(s, HELD, held=True) for s in seeds]
    assert all(v.is_held(HELD) for v in held) and held != train
    assert len({(v.speed, v.pitch) for v in train}) > 200  # speeds and pitches vary per seed too


def test_spoken_share_follows_the_setting():
    seeds = range(1_000_000, 1_004_000)
    assert not any(is_spoken(s, 0.0) for s in seeds) and all(is_spoken(s, 1.0) for s in seeds)
    share = np.mean([is_spoken(s, 0.3) for s in seeds])
    assert abs(share - 0.3) < 0.03
    assert [is_spoken(s, 0.3) for s in seeds] == [is_spoken(s, 0.3) for s in seeds]
    assert all(is_spoken(s, 0.6) for s in seeds if is_spoken(s, 0.3))  # a larger share keeps the smaller one's episodes


def test_mission_voices_of_a_layout():
    from types import SimpleNamespace

    from worldloom.world.task import mission_voices

    plain, heard = layouts()
    eps = [SimpleNamespace(seed=s) for s in range(200)]
    assert mission_voices(plain, eps, 0.5) == [None] * 200  # no audio tokenizer: words only
    voices = mission_voices(heard, eps, 0.5)
    spoken = [v for v in voices if v is not None]
    assert 60 < len(spoken) < 140 and not any(v.is_held(SMALL.held_out()) for v in spoken)
    assert voices == [voice_for(s, HELD) if is_spoken(s, 0.5) else None for s in range(200)]


@needs_espeak
def test_a_saved_layout_loads_back_with_its_audio_tokenizer(tmp_path):
    plain, heard = layouts()
    heard.save(tmp_path / "heard")
    plain.save(tmp_path / "plain")
    assert json.loads((tmp_path / "heard" / "stream.json").read_text())["audio_tokenizer"] == "audio"
    assert "audio_tokenizer" not in json.loads((tmp_path / "plain" / "stream.json").read_text())
    back = StreamLayout.load(tmp_path / "heard")
    assert back.audio is not None and back.offset == heard.offset and back.vocab_size == heard.vocab_size
    v = voice_for(11, HELD)
    assert (back.prefix("go to a blue key", v) == heard.prefix("go to a blue key", v)).all()
    old = StreamLayout.load(tmp_path / "plain")  # a folder written without audio: the same ids, no slice
    assert old.audio is None and old.offset == plain.offset and old.vocab_size == plain.vocab_size


def test_spoken_config_errors():
    for bad, msg in [(["stream.spoken=1.5"], r"stream.spoken must be in \[0, 1\]"),
                     (["stream.spoken=-0.1"], r"stream.spoken must be in \[0, 1\]"),
                     (["recipe=text", "stream.spoken=0.5"], "is for a world run"),
                     (["recipe=talk", "stream.spoken=0.5"], "is for a world run")]:
        with pytest.raises(ConfigError, match=msg):
            build_config(None, bad)
    assert build_config("babyai-spoken", []).stream.spoken == 0.5 and build_config("babyai", []).stream.spoken == 0


def test_other_missions_give_each_level_a_mission_not_its_own():
    from worldloom.world.rollout.agent import level_missions, other_missions

    assert other_missions(["a", "a", "b", "c"]) == ["b", "b", "c", "a"]
    assert other_missions(["a", "a"]) == ["a", "a"]  # nothing else to give
    own = level_missions("BabyAI-GoToLocal-v0", [5, 6, 7, 8])
    assert all(m in missions() for m in own) and own == level_missions("BabyAI-GoToLocal-v0", [5, 6, 7, 8])
    assert all(o != m for o, m in zip(other_missions(own), own)) or len(set(own)) == 1


def test_run_episodes_gives_the_model_the_mission_asked_for(world_run):
    from worldloom.run import load_world_run
    from worldloom.world.rollout import agent

    run = load_world_run(world_run)
    seen = []
    real = run.layout.prefix
    run.layout.prefix = lambda m, v=None: seen.append((m, v)) or real(m, v)
    agent.run_episodes(run.model, run.layout, "BabyAI-GoToLocal-v0", [3, 4], envs=2, missions=["go to the red ball", None],
                       max_steps=2)
    assert seen[0] == ("go to the red ball", None) and seen[1] == (agent.level_missions("BabyAI-GoToLocal-v0", [4])[0], None)
    with pytest.raises(ValueError, match="1 missions for 2 seeds"):
        agent.run_episodes(run.model, run.layout, "BabyAI-GoToLocal-v0", [3, 4], missions=["x"])


TINY_AUDIO = ["audio.utterances=24", "audio.val_utterances=4", "audio.n_mels=32", "audio.channels=32", "audio.codebook=32",
              "audio.code_dim=8", "audio.griffin_lim=4", "audio.tokenizer_steps=20"]


@needs_espeak
def test_spoken_preset_trains_and_reports_text_and_spoken_success_on_the_same_seeds(world_dataset, tmp_path, capsys,
                                                                                   monkeypatch):
    from worldloom.cli import main
    from worldloom.run import load_world_run
    from worldloom.world.rollout import agent
    from worldloom.world.task import AUDIO_DIR, WorldTask

    swapped = []  # passes played with missions other than the levels' own
    real_run = agent.run_episodes

    def counting(*a, **k):
        if k.get("missions"):
            swapped.append(1)
        return real_run(*a, **k)

    monkeypatch.setattr(agent, "run_episodes", counting)

    args = ["train", "babyai-spoken", "--no-progress", f"out_dir={tmp_path}", "name=spoken", f"data.path={world_dataset}",
            *TINY_WORLD, *TINY_AUDIO, "stream.spoken=0.5", "eval.plan_episodes=0"]
    assert main(args) == 0
    run = tmp_path / "spoken"
    assert (run / AUDIO_DIR / "speech" / "train.npz").is_file()  # the tokenizer stage ran inside the run
    for f in ("stream/audio_tokenizer.json", "stream/audio_tokenizer.safetensors", "eval.json", "report.md"):
        assert (run / f).is_file(), f
    res = json.loads((run / "eval.json").read_text())
    sp = res["spoken"]
    assert sp["text"] == res["real"]["success"] and sp["held_out"] == "en-029,f4" and sp["policy"] == "sampled"
    for key in ("training_voices", "held_out_voices", "other_mission"):
        assert sp[key]["episodes"] == res["real"]["episodes"] == 6 and sp[key]["seeds"] == res["real"]["seeds"]
        assert 0 <= sp[key]["success"] <= 1
    assert sp["gap"] == pytest.approx(sp["text"] - sp["training_voices"]["success"])
    assert res["mission_control"]["episodes"] == 6 and sp["other_mission"]["success"] == res["mission_control"]["other"]
    assert len(swapped) == 1  # the control and the spoken figures share one pass
    report = (run / "report.md").read_text()
    assert "Success with the mission spoken" in report and "another level's mission" in report

    loaded = load_world_run(run)  # the run stands alone: its layout holds the tokenizer
    assert loaded.layout.audio is not None and loaded.model.cfg.vocab_size == loaded.layout.vocab_size
    shutil.rmtree(run / AUDIO_DIR)
    task = WorldTask(loaded.cfg, run, resuming=True)
    assert 5 <= task.n_spoken <= 35  # of 40 training episodes, at share 0.5
    lo = task.layout.offset["audio"]
    heard = [e for e in task.data.splits["train"] if (e.prefix[1:-1] >= lo).all()]
    read = [e for e in task.data.splits["train"] if (e.prefix[1:-1] < lo).all()]
    assert len(heard) == task.n_spoken and len(heard) + len(read) == 40
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--episodes", "4"]) == 0
    again = json.loads(capsys.readouterr().out)["spoken"]
    assert again["training_voices"]["episodes"] == 4 and again["held_out_voices"]["seeds"] == again["training_voices"]["seeds"]


@needs_espeak
def test_a_spoken_run_needs_an_audio_tokenizer(world_dataset, tmp_path):
    from worldloom.errors import DataError
    from worldloom.train import train

    cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={tmp_path}", "name=x", "stream.spoken=0.5"])
    with pytest.raises(DataError, match="audio.tokenizer=RUN"):
        train(cfg, progress=False, log=lambda *a: None)
