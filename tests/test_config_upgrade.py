"""Run folders, presets and command lines from before the nested model config (model.moe, model.mamba,
model.mamba2) still load: the flat keys are moved on read.

tests/data/old_config_*.yaml are config.yaml files written by worldloom at commit fe7e378 (flat
ModelConfig): the babyai preset resolved, and a text run trained with a hybrid mamba/mamba2/attn
stack, MoE feed-forward and non-default Mamba, Mamba-2 and MoE settings.
old_hybrid_moe_params.json lists that run's parameter names and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from worldloom.cli import main
from worldloom.config import (Mamba2Config, MambaConfig, MoEConfig, RunConfig, build_config, from_dict, read_yaml,
                              save_yaml, to_dict, upgrade_model_keys)
from worldloom.errors import ConfigError
from worldloom.model import LWM
from worldloom.run import load_run, read_run_config

DATA = Path(__file__).parent / "data"
OLD_BABYAI = DATA / "old_config_babyai.yaml"
OLD_HYBRID = DATA / "old_config_hybrid_moe.yaml"
FLAT = ("moe_experts", "moe_top_k", "moe_capacity", "moe_balance_coef", "moe_z_coef", "mamba_d_state",
        "mamba_expand", "mamba_d_conv", "mamba2_d_state", "mamba2_head_dim")


def test_fixtures_are_old_format():
    for path in (OLD_BABYAI, OLD_HYBRID):
        model = read_yaml(path)["model"]
        assert set(FLAT) <= set(model) and not {"moe", "mamba", "mamba2"} & set(model)


def test_old_babyai_config_reads_as_the_preset_does_now():
    # keys the preset gained after fe7e378 read as their defaults in the old file: name them here
    later = ["stream.places=false", "stream.match=false"]
    assert from_dict(RunConfig, read_yaml(OLD_BABYAI)) == build_config("babyai", later)


def test_old_hybrid_moe_config_upgrades_to_the_same_model():
    cfg = from_dict(RunConfig, read_yaml(OLD_HYBRID))
    m = cfg.model
    assert m.moe == MoEConfig(experts=4, top_k=1, capacity=1.5, balance_coef=0.02, z_coef=0.002)
    assert m.mamba == MambaConfig(d_state=8, expand=1, d_conv=3)
    assert m.mamba2 == Mamba2Config(d_state=16, head_dim=8, expand=1, d_conv=3)  # Mamba-2 shared Mamba's expand, d_conv
    assert (m.layer_kinds, m.ffn, m.chunk, m.vocab_size) == (["mamba", "mamba2", "attn"], "moe", 8, 283)
    with torch.device("meta"):
        model = LWM(m)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == json.loads((DATA / "old_hybrid_moe_params.json").read_text())  # old checkpoints fit exactly


def test_upgrade_moves_flat_keys_and_leaves_the_rest():
    old = {"n_layer": 2, "moe_top_k": 1, "mamba_d_conv": 3, "moe": {"experts": 4}}
    new = upgrade_model_keys(old)
    assert new == {"n_layer": 2, "moe": {"experts": 4, "top_k": 1}, "mamba": {"d_conv": 3}, "mamba2": {"d_conv": 3}}
    assert "moe_top_k" in old  # the input is not modified
    assert upgrade_model_keys({"n_layer": 2}) == {"n_layer": 2}


def test_old_flat_overrides_still_accepted_on_the_command_line():
    cfg = build_config(None, ["model.moe_experts=4", "model.moe_top_k=1", "model.mamba_expand=1", "model.mamba2_head_dim=32"])
    assert (cfg.model.moe.experts, cfg.model.moe.top_k) == (4, 1)
    assert cfg.model.mamba.expand == cfg.model.mamba2.expand == 1 and cfg.model.mamba2.head_dim == 32
    assert build_config(None, ["model.moe.experts=6", "model.moe_experts=5"]).model.moe.experts == 5  # flat wins
    assert build_config(None, ["model.moe.experts=6"]).model.moe.experts == 6


@pytest.mark.parametrize("overrides, needle", [
    (["model.moe_top_k=9"], "model.moe.top_k (9) must be at most model.moe.experts (8)"),
    (["model.mamba_d_state=0"], "model.mamba.d_state must be positive"),
    (["model.moe.bogus=1"], "unknown config key 'model.moe.bogus'"),
    (["model.moe_expert=4"], "did you mean 'model.moe.experts'"),
    (["model.topk=1"], "did you mean 'model.moe.top_k'"),
    (["model.moe=3", "model.moe_experts=4"], "model.moe must be a mapping"),
    (["model.mamba2.head_dim=x"], "model.mamba2.head_dim must be int"),
])
def test_errors_name_the_nested_key_in_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        build_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_saved_config_is_nested_and_reads_back():
    cfg = build_config(None, ["model.ffn=moe", "model.moe.experts=3", "model.mamba2.d_conv=2"])
    model = to_dict(cfg)["model"]
    assert model["moe"]["experts"] == 3 and model["mamba2"]["d_conv"] == 2 and not set(FLAT) & set(model)
    assert from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


# ---------------------------------------------------------------- an old run folder: load, generate, resume


PANGRAM = "the quick brown fox jumps over a lazy dog and then runs far away "  # the characters of the old run's text


def _new_keys(model: dict) -> list[str]:
    """model.* overrides, in the new keys, that build the fixture's model."""
    m = from_dict(RunConfig, {"model": model}).model
    skip = {"vocab_size", "slots", "period", "frame_tokens", "slot_grid"}
    out = []
    for key, value in to_dict(m).items():
        if isinstance(value, dict):
            out += [f"model.{key}.{k}={v}" for k, v in value.items()]
        elif key not in skip:
            out.append(f"model.{key}={value}")
    return out


def test_old_run_folder_loads_generates_and_resumes(tmp_path, capsys):
    corpus = tmp_path / "t.txt"
    corpus.write_text(PANGRAM * 150)
    old = read_yaml(OLD_HYBRID)
    train = ["train.max_steps=2", "train.eval_interval=2", "train.eval_batches=1", "train.batch_size=2",
             "train.precision=fp32", "train.threads=1", "train.log_interval=1"]
    assert main(["train", "shakespeare-char", *_new_keys(old["model"]), *train, f"data.path={corpus}",
                 f"out_dir={tmp_path}", "name=r", "--no-progress"]) == 0, capsys.readouterr().err
    run_dir = tmp_path / "r"
    new_cfg = read_run_config(run_dir)
    # the folder as the old code wrote it: its config.yaml in the flat format, the model section verbatim
    saved = to_dict(new_cfg)
    save_yaml({**saved, "model": old["model"]}, run_dir / "config.yaml")
    assert "moe_experts" in read_yaml(run_dir / "config.yaml")["model"]
    assert read_run_config(run_dir) == new_cfg

    run = load_run(run_dir)
    assert run.cfg == new_cfg and run.tokenizer.vocab_size == 283
    capsys.readouterr()
    assert main(["generate", str(run_dir), "the quick", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the quick")

    assert main(["train", "--resume", str(run_dir), "train.max_steps=3", "--no-progress"]) == 0, capsys.readouterr().err
    rewritten = read_yaml(run_dir / "config.yaml")["model"]
    assert not set(FLAT) & set(rewritten) and rewritten["moe"]["experts"] == 4  # written back in the new format
    assert load_run(run_dir).state["step"] == 3
