"""Typed config: unknown keys, wrong types, override parsing, presets, YAML round trips."""

from __future__ import annotations

import math

import pytest

from worldloom.config import (
    ModelConfig,
    RunConfig,
    apply_overrides,
    build_config,
    from_dict,
    load_preset,
    parse_override,
    preset_description,
    preset_names,
    read_yaml,
    save_yaml,
    to_dict,
)
from worldloom.errors import ConfigError, WorldloomError


def config_error(preset, overrides) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(preset, overrides)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_names_it_suggests_and_lists_valid_keys():
    msg = config_error(None, ["model.n_layers=4"])
    assert "'model.n_layers'" in msg
    assert "did you mean 'model.n_layer'?" in msg
    for key in ("n_head", "n_kv_head", "d_model", "context", "dropout", "tie_weights", "backbone"):
        assert key in msg


def test_unknown_top_level_key_and_group():
    msg = config_error(None, ["nmae=x"])
    assert "'nmae'" in msg and "did you mean 'name'?" in msg
    assert "out_dir" in msg and "model" in msg and "train" in msg
    msg = config_error(None, ["trian.lr=0.1"])
    assert "'trian'" in msg and "did you mean 'train'?" in msg


def test_unknown_key_without_close_match_still_lists_keys():
    msg = config_error(None, ["train.zzzzzz=1"])
    assert "'train.zzzzzz'" in msg and "did you mean" not in msg
    assert "batch_size" in msg and "max_steps" in msg


def test_unknown_key_in_preset_based_config():
    msg = config_error("shakespeare-char", ["train.learning_rate=0.1"])
    assert "'train.learning_rate'" in msg and "valid keys under 'train.'" in msg


# ---------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("model.n_layer=abc", "model.n_layer", "int"),
        ("model.n_layer=2.5", "model.n_layer", "int"),
        ("model.n_layer=true", "model.n_layer", "int"),  # a bool is not an int
        ("train.lr=[1]", "train.lr", "float"),
        ("train.lr=abc", "train.lr", "float"),
        ("model.tie_weights=3", "model.tie_weights", "bool"),
        ("train.compile=maybe", "train.compile", "bool"),
        ("model={a: 1}", "model.a", ""),  # a mapping with an unknown key
        ("model=5", "model", "mapping"),
        ("name=[x]", "name", "str"),
    ],
)
def test_wrong_type_is_a_config_error(override, key, expected):
    msg = config_error(None, [override])
    assert key in msg
    assert expected in msg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.d_model=30", "model.n_head=4"], "divisible"),
        (["model.d_model=36", "model.n_head=4"], "even"),  # head size 9
        (["model.n_head=6", "model.n_kv_head=4", "model.d_model=48"], "n_kv_head"),
        (["model.n_layer=0"], "model.n_layer"),
        (["model.dropout=1.0"], "dropout"),
        (["train.min_lr=0.1", "train.lr=0.01"], "min_lr"),
        (["train.precision=fp8"], "train.precision"),
        (["tokenizer.kind=word"], "tokenizer.kind"),
        (["tokenizer.kind=bpe", "tokenizer.vocab_size=100"], "vocab_size"),
        (["data.val_fraction=0"], "val_fraction"),
    ],
)
def test_invalid_values_are_config_errors(overrides, needle):
    assert needle in config_error(None, overrides)


def test_override_into_a_value_is_an_error():
    msg = config_error("shakespeare-char", ["model.n_layer.x=1"])
    assert "model.n_layer.x" in msg


@pytest.mark.parametrize("text", ["model.n_layer", "=3", " =3"])
def test_malformed_override(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_config_error_is_a_worldloom_error():
    assert issubclass(ConfigError, WorldloomError)


# ---------------------------------------------------------------- override parsing


def test_overrides_parse_ints_floats_bools_and_strings():
    cfg = build_config(None, [
        "model.n_layer=3", "model.n_head=2", "model.d_model=64",
        "train.lr=0.01", "train.min_lr=0.001", "train.max_minutes=5",
        "model.tie_weights=false", "train.compile=true", "model.dropout=0",
        "name=123", "data.path=a=b.txt",
    ])
    assert cfg.model.n_layer == 3 and type(cfg.model.n_layer) is int
    assert cfg.train.lr == 0.01 and type(cfg.train.lr) is float
    assert cfg.train.max_minutes == 5.0 and type(cfg.train.max_minutes) is float  # int -> float
    assert cfg.model.dropout == 0.0 and type(cfg.model.dropout) is float
    assert cfg.model.tie_weights is False and cfg.train.compile is True
    assert cfg.name == "123"  # a number where a string is expected stays a string
    assert cfg.data.path == "a=b.txt"  # only the first '=' splits


@pytest.mark.parametrize("raw, value", [("3e-4", 3e-4), ("1E-3", 1e-3), ("2.5e-4", 2.5e-4), ("5e-5", 5e-5)])
def test_scientific_notation_floats(raw, value):
    # PyYAML (YAML 1.1) reads '3e-4' (no dot) as a string; it must still be a valid float here.
    cfg = build_config(None, [f"train.lr={raw}", "train.min_lr=0"])
    assert math.isclose(cfg.train.lr, value) and type(cfg.train.lr) is float


def test_later_override_wins_and_preset_fields_are_kept():
    preset = load_preset("shakespeare-char")
    cfg = build_config("shakespeare-char", ["model.n_layer=2", "model.n_layer=3"])
    assert cfg.model.n_layer == 3
    assert cfg.model.d_model == preset["model"]["d_model"]
    assert cfg.name == "shakespeare-char"  # the preset name is the default run name


def test_apply_overrides_builds_nested_dict():
    assert apply_overrides({}, ["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


# ---------------------------------------------------------------- presets


def test_unknown_preset_suggests_close_name():
    msg = config_error("shakespeare-chr", [])
    assert "unknown preset 'shakespeare-chr'" in msg
    assert "did you mean 'shakespeare-char'?" in msg
    for name in preset_names():
        assert name in msg


def test_shipped_presets_exist():
    assert {"shakespeare-char", "text-bpe"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds(name, tmp_path):
    cfg = build_config(name, [])
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name
    assert preset_description(name)
    # the resolved config survives the config.yaml round trip a run relies on
    save_yaml(to_dict(cfg), tmp_path / "config.yaml")
    assert from_dict(RunConfig, read_yaml(tmp_path / "config.yaml")) == cfg


# ---------------------------------------------------------------- YAML files


def test_yaml_round_trip_keeps_small_floats(tmp_path):
    cfg = build_config(None, ["model.norm_eps=1e-6", "train.min_lr=0.00001", "model.rope_theta=500000.0"])
    save_yaml(to_dict(cfg), tmp_path / "c.yaml")
    back = from_dict(RunConfig, read_yaml(tmp_path / "c.yaml"))
    assert back == cfg
    assert back.model.norm_eps == 1e-6


@pytest.mark.parametrize("content, needle", [("a: [1,\n", "not valid YAML"), ("- 1\n- 2\n", "mapping"), ("", "mapping")])
def test_read_yaml_errors(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        read_yaml(path)


def test_read_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_model_config_derived_sizes():
    mc = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=64, context=8)
    assert mc.kv_heads == 2 and mc.head_dim == 16
    assert mc.ff_dim % 64 == 0 and mc.ff_dim >= 8 * 64 // 3
    assert ModelConfig(n_head=4, d_model=64, context=8).kv_heads == 4
    assert ModelConfig(n_head=4, d_model=64, context=8, d_ff=40).ff_dim == 40
