"""Typed configuration: one dataclass per component, presets in YAML, `key.sub=value` overrides.

Every value that reaches a component passes through `from_dict`, which rejects unknown keys
(listing the valid ones and suggesting the closest) and values of the wrong type. A run
saves its fully resolved config as ``config.yaml`` so that it can be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    path: str = ""  # text recipe: a UTF-8 text file. world recipe: a collected episode folder ("" = collect into the run folder)
    val_fraction: float = 0.1  # text: the last fraction of the file is held out
    episodes: int = 5000  # world: training episodes to collect (validation ones come from other seeds)
    val_episodes: int = 300  # world: held-out episodes for world-model accuracy and validation loss
    perturbed: float = 0.5  # world: fraction of episodes in which random actions are injected
    epsilon: float = 0.2  # world: probability of a random action at each step of a perturbed episode
    workers: int = 2  # world: parallel collection processes
    bot_timeout: float = 2.0  # world: seconds allowed per bot replan() call; slower episodes are dropped
    seed: int = 0  # world: base environment seed of the collection
    onpolicy_episodes: int = 0  # world: DAgger: the model plays this many training seeds, labelled by the bot (0 = off)
    onpolicy_at: float = 0.5  # world: ... after this fraction of the training budget; training goes on with them
    policy: str = "bot"  # world: who plays the collected episodes: bot (BabyAI levels: the BabyAI bot, its actions the policy's labels) | random (uniform actions, no labels: a world model's data, e.g. crafter, ALE/*)
    max_steps: int = 0  # world: episodes cut (truncated) after this many steps (0: the environment's own limit)

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("episodes", "val_episodes", "workers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        for name in ("perturbed", "epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.bot_timeout <= 0:
            raise ConfigError(f"data.bot_timeout must be positive, got {self.bot_timeout}")
        if self.seed < 0:
            raise ConfigError(f"data.seed must be >= 0, got {self.seed}")
        if self.onpolicy_episodes < 0:
            raise ConfigError(f"data.onpolicy_episodes must be >= 0, got {self.onpolicy_episodes}")
        if not 0.0 < self.onpolicy_at < 1.0:
            raise ConfigError(f"data.onpolicy_at must be between 0 and 1, got {self.onpolicy_at}")
        if self.policy not in ("bot", "random"):
            raise ConfigError(f"data.policy must be bot or random, got {self.policy!r}")
        if self.onpolicy_episodes and self.policy != "bot":
            raise ConfigError("data.onpolicy_episodes (DAgger) needs the BabyAI bot to label states: data.policy=bot")
        if not 0 <= self.max_steps <= 10**7:
            raise ConfigError(f"data.max_steps must be in 0..10000000 (0: the environment's limit), got {self.max_steps}")


@dataclass
class EnvConfig:
    id: str = "BabyAI-GoToLocal-v0"  # any MiniGrid-* or BabyAI-* gymnasium id


@dataclass
class StreamConfig:
    """How episodes become one token stream, and how much each modality counts in the loss."""

    reward_bins: int = 16  # rewards in (0, 1] fall in this many bins; 0 has a token of its own
    reward_lo: float = 0.0  # rewards in [reward_lo, 0) get reward_bins bins of their own (e.g. -1: Atari's lost points); 0: negative rewards count as 0
    obs: str = "tokens"  # tokens: every observation token is a stream position | encoded: a frame encoder hands the backbone obs_vectors vectors per observation and a frame decoder predicts the next observation's tokens in parallel
    obs_vectors: int = 1  # stream.obs=encoded: vectors per observation
    mission_vec: str = ""  # add a projection of the episode's mission vector (mean word embedding) to step positions, so the policy need not attend back to the prefix to read it: "" off | all (every step position) | policy (the position that predicts the action)
    obs_film: bool = False  # stream.obs=encoded: the frame encoder's convolutions are conditioned (FiLM) on the episode's mission words, as BabyAI's agents are
    mission_encoder: str = "mean"  # the mission vector of obs_film / mission_vec: mean (of the word embeddings) | gru (a GRU read of the words, as BabyAI 1.1's agent)
    parallel_obs: bool = False  # also predict all tokens of the next observation in one pass (frame head; stream.obs=tokens)
    step_skip: bool = True  # each position also sees the token at its target's place one step earlier (stream.obs=tokens; the encoded decoder reads the previous frame itself)
    # the step-skip input of an observation cell reads the last id seen at the world place that cell shows (the
    # environment's place rule: dead reckoning from views and actions, worldloom.world.places), not the same cell
    # of the previous view; needs stream.step_skip and stream.obs=tokens and an environment with a place rule
    places: bool = False
    # mission words that name an attribute of an observation cell (an object type, a colour: the environment's own
    # names) and the cells that show it share that attribute's learned vector, added to their embeddings, so that
    # "red ball" in the mission and a red ball in the view start alike (a grid tokenizer's cells)
    names: bool = False
    # every observation cell also embeds whether its object type and its colour are named by the episode's mission
    # (four learned vectors: neither, object, colour, both), so the cells the mission speaks of stand out in the
    # model's input before any attention reads the mission (a grid tokenizer's cells; the token stream)
    match: bool = False
    grid_pos: bool = False  # observation cells also embed their row and column in the view (2-D position)
    tokenizer: str = ""  # pixel environments (rgb:<MiniGrid id>, crafter, ALE/*): an image-tokenizer run folder whose codes are the observation tokens; empty: the world pipeline trains one first in <run>/tokenizer (vision.*, vision.minutes)
    weight_obs: float = 1.0
    weight_first_obs: float = 0.0  # the first observation after the mission (a new level: not a transition)
    weight_action: float = 1.0
    weight_reward: float = 1.0
    weight_done: float = 1.0
    weight_mission: float = 0.0  # predicting the mission text itself (0: only condition on it)
    weight_frame: float = 1.0  # the frame head's loss (with parallel_obs)
    # share (0..1) of training episodes whose mission enters the stream as speech: audio tokens of a voice drawn from
    # the episode's seed (worldloom.audio.spoken), through the audio tokenizer of audio.tokenizer (else trained first
    # into <run>/audio-tokenizer); eval then reports success with the text and the spoken mission. 0: words only
    spoken: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.spoken <= 1.0:
            raise ConfigError(f"stream.spoken must be in [0, 1] (the share of training episodes whose mission is spoken), got {self.spoken}")
        if self.reward_bins < 1:
            raise ConfigError(f"stream.reward_bins must be at least 1, got {self.reward_bins}")
        if not -1e6 <= self.reward_lo <= 0:
            raise ConfigError(f"stream.reward_lo must be <= 0 (0: no negative rewards), got {self.reward_lo}")
        if self.obs not in ("tokens", "encoded"):
            raise ConfigError(f"stream.obs must be tokens or encoded, got {self.obs!r}")
        if not 1 <= self.obs_vectors <= 64:
            raise ConfigError(f"stream.obs_vectors must be in 1..64, got {self.obs_vectors}")
        if self.mission_vec not in ("", "all", "policy"):
            raise ConfigError(f"stream.mission_vec must be empty (off), all or policy; got {self.mission_vec!r}")
        if self.mission_encoder not in ("mean", "gru"):
            raise ConfigError(f"stream.mission_encoder must be mean or gru; got {self.mission_encoder!r}")
        if self.obs_film and self.obs != "encoded":
            raise ConfigError("stream.obs_film conditions the frame encoder of stream.obs=encoded; set stream.obs=encoded or drop stream.obs_film")
        if self.places and (self.obs != "tokens" or not self.step_skip):
            raise ConfigError("stream.places changes what the token stream's step-skip input reads; it needs stream.obs=tokens and stream.step_skip=true (the babyai preset sets it: add stream.places=false)")
        if self.match and self.obs != "tokens":
            raise ConfigError("stream.match marks the token stream's observation cells; it needs stream.obs=tokens (the babyai preset sets it: add stream.match=false)")
        if self.obs == "encoded" and self.parallel_obs:
            raise ConfigError("stream.parallel_obs is the token stream's frame head; stream.obs=encoded has its own frame decoder: drop stream.parallel_obs")
        for name in ("weight_obs", "weight_first_obs", "weight_action", "weight_reward", "weight_done", "weight_mission", "weight_frame"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stream.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """World-model runs: what `worldloom eval` (and the end of `worldloom train`) measures."""

    episodes: int = 500  # real-environment episodes on seeds never used in training or validation
    envs: int = 100  # environments stepped together (one batch)
    greedy: bool = False  # act with the likeliest action (false: sample from the policy; the greedy policy is reported too)
    plan_episodes: int = 100  # episodes for planning in imagination (0 = skip)
    mission_control: int = 200  # the first this many evaluation seeds played again with another level's mission (how much the mission is worth: a policy that ignores it scores the same); 0 = skip, and environments without missions skip it
    plan_horizon: int = 4  # imagined steps per candidate
    transitions: int = 2000  # held-out transitions scored for next-observation accuracy (per kind)
    open_loop: int = 200  # held-out episodes imagined open-loop for accuracy after 1/5/10 steps
    max_steps: int = 0  # real-environment episodes cut (truncated) after this many steps (0: the environment's own limit)
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.max_steps <= 10**7:
            raise ConfigError(f"eval.max_steps must be in 0..10000000 (0: the environment's limit), got {self.max_steps}")
        for name in ("episodes", "envs", "transitions", "open_loop", "plan_horizon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.plan_episodes < 0:
            raise ConfigError(f"eval.plan_episodes must be >= 0, got {self.plan_episodes}")
        if self.mission_control < 0:
            raise ConfigError(f"eval.mission_control must be >= 0 (0 = skip), got {self.mission_control}")


@dataclass
class TokenizerConfig:
    kind: str = "char"  # char | bpe (learned by a new run) | hf (imported with its model: `worldloom import hf`)
    vocab_size: int = 4096  # bpe only: size of the learned vocabulary

    def __post_init__(self):
        if self.kind not in ("char", "bpe", "hf"):
            raise ConfigError(f"tokenizer.kind must be 'char' or 'bpe' (or 'hf', imported), got {self.kind!r}")
        if self.kind == "bpe" and self.vocab_size < 300:
            raise ConfigError(f"tokenizer.vocab_size must be at least 300 for bpe (256 bytes + merges), got {self.vocab_size}")


FFNS = ("swiglu", "moe", "none")


def _positive(group: str, cfg, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{group}.{name} must be positive, got {getattr(cfg, name)}")


@dataclass
class MoEConfig:
    """The mixture-of-experts feed-forward (model.ffn=moe)."""

    experts: int = 8
    top_k: int = 2
    capacity: float = 0.0  # capacity factor per expert; 0 = no limit
    balance_coef: float = 0.01  # load-balancing auxiliary loss weight
    z_coef: float = 0.001  # router z-loss weight

    def __post_init__(self):
        _positive("model.moe", self, ("experts", "top_k"))
        if self.top_k > self.experts:
            raise ConfigError(f"model.moe.top_k ({self.top_k}) must be at most model.moe.experts ({self.experts})")
        for name in ("capacity", "balance_coef", "z_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class MambaConfig:
    """Mamba layers (mixer mamba)."""

    d_state: int = 16
    expand: int = 2  # d_inner = expand * d_model
    d_conv: int = 4  # width of the causal depthwise convolution

    def __post_init__(self):
        _positive("model.mamba", self, ("d_state", "expand", "d_conv"))


@dataclass
class Mamba2Config:
    """Mamba-2 (SSD) layers (mixer mamba2)."""

    d_state: int = 64  # state size N
    head_dim: int = 64  # channels per head; d_model * expand must be a multiple
    expand: int = 2
    d_conv: int = 4

    def __post_init__(self):
        _positive("model.mamba2", self, ("d_state", "head_dim", "expand", "d_conv"))


# Flat keys of the model configs saved before the sub-configs existed -> the keys that hold them now.
# Mamba-2 used Mamba's expand and d_conv, so an old value of those sets both.
FLAT_MODEL_KEYS = {
    "moe_experts": ("moe.experts",), "moe_top_k": ("moe.top_k",), "moe_capacity": ("moe.capacity",),
    "moe_balance_coef": ("moe.balance_coef",), "moe_z_coef": ("moe.z_coef",),
    "mamba_d_state": ("mamba.d_state",), "mamba_expand": ("mamba.expand", "mamba2.expand"),
    "mamba_d_conv": ("mamba.d_conv", "mamba2.d_conv"),
    "mamba2_d_state": ("mamba2.d_state",), "mamba2_head_dim": ("mamba2.head_dim",),
}


def upgrade_model_keys(data: dict) -> dict:
    """A model mapping with the flat keys of older run folders and command lines moved into the
    sub-configs (``moe_top_k`` -> ``moe: {top_k}``); a flat key wins over the nested one. A new dict."""
    out = dict(data)
    for old, places in FLAT_MODEL_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        for place in places:
            group, key = place.split(".")
            sub = out.get(group, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"model.{group} must be a mapping of keys, got {type(sub).__name__} {sub!r}")
            out[group] = {**sub, key: value}
    return out


def _mixers():
    """The mixer registry (backbones/mixer.py), imported when first needed: it pulls in torch."""
    from .backbones import mixer

    return mixer


@dataclass
class ModelConfig:
    backbone: str = "transformer"  # a name in worldloom.backbones.BACKBONES
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # grouped-query attention; 0 means n_head (plain multi-head)
    d_model: int = 384
    d_ff: int = 0  # SwiGLU hidden width; 0 means 8/3 * d_model rounded up to a multiple of 64
    context: int = 256
    dropout: float = 0.0
    tie_weights: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int = 0  # set from the tokenizer when a run starts
    layers: str = ""  # per-layer mixers, comma-separated (attn, mamba, mamba2, retnet, linear); "" = all of the backbone's kind
    ffn: str = "swiglu"  # feed-forward after each mixer: swiglu | moe | none
    attention: str = "sdpa"  # sdpa | ring: under torchrun, training steps split each sequence over the ranks (ring attention)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    chunk: int = 0  # time steps per chunk of the Mamba scan / SSD / chunkwise retention and linear attention (any value, same result); 0 = automatic (Mamba: by batch size, the others: 64)
    slots: int = 0  # learned slot embeddings (position within a world step); set from the stream layout
    period: int = 0  # step-skip input: each position also embeds the token one period (a world step) before its target; set from the stream
    frame_tokens: int = 0  # frame head: tokens of the next observation predicted in one pass (0 = off); set from the stream
    slot_grid: int = 0  # slots 1..slot_grid**2 are the cells of a square grid (row-major): each also embeds its row and column; set from the stream
    obs_vectors: int = 0  # encoded observations: each observation's obs_len tokens enter the backbone as this many vectors of a frame encoder (0 = as tokens); set from the stream
    obs_len: int = 0  # tokens of one observation (encoded observations); set from the stream
    obs_grid: int = 0  # the observation's first obs_grid**2 tokens are a square grid of cells (encoded observations); set from the stream
    mission_vec: str = ""  # world streams: "" | all | policy: which step positions add a projection of the episode's mission vector (mean word embedding); set from the stream
    obs_film: bool = False  # encoded observations: FiLM-condition the frame encoder on the mission words (mean embedding); set from the stream
    mission_encoder: str = "mean"  # the mission vector (obs_film, mission_vec): mean word embedding | gru (a GRU over the words); set from the stream
    obs_decoder_layers: int = 2  # encoded observations: bidirectional layers of the frame decoder (next frame from the step's state and the previous frame)
    value_head: bool = False  # a scalar head on the last hidden state (reward models); set by the reward recipe
    name_attrs: int = 0  # world streams with stream.names or stream.match: named attributes (which ids show or name them is a buffer); set from the stream
    name_vectors: bool = True  # stream.names: a learned vector per named attribute, added to the ids that show or name it
    mission_match: bool = False  # stream.match: cells embed which of their attributes the episode's mission names

    def __post_init__(self):
        for name, cls in (("moe", MoEConfig), ("mamba", MambaConfig), ("mamba2", Mamba2Config)):
            if isinstance(getattr(self, name), dict):  # e.g. ModelConfig(**to_dict(cfg))
                setattr(self, name, from_dict(cls, getattr(self, name), prefix=f"model.{name}."))
        for name in ("n_layer", "n_head", "d_model", "context"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError(f"head size d_model/n_head = {self.d_model // self.n_head} must be even for rotary positions")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.slots < 0 or self.frame_tokens < 0 or self.period < 0 or self.slot_grid < 0:
            raise ConfigError("model.slots, model.period, model.frame_tokens and model.slot_grid must be >= 0")
        if self.slot_grid and self.slot_grid**2 >= max(self.slots, 1):
            raise ConfigError(f"model.slot_grid={self.slot_grid} needs more than {self.slot_grid**2} slots, got model.slots={self.slots}")
        if self.obs_vectors < 0 or self.obs_len < 0 or self.obs_grid < 0 or self.obs_decoder_layers < 1:
            raise ConfigError("model.obs_vectors, model.obs_len and model.obs_grid must be >= 0 and model.obs_decoder_layers >= 1")
        if self.mission_vec not in ("", "all", "policy"):
            raise ConfigError(f"model.mission_vec must be empty (off), all or policy; got {self.mission_vec!r}")
        if self.mission_vec and not self.slots:
            raise ConfigError("model.mission_vec is for world-model streams (model.slots > 0)")
        if self.mission_encoder not in ("mean", "gru"):
            raise ConfigError(f"model.mission_encoder must be mean or gru; got {self.mission_encoder!r}")
        if self.obs_film and not self.obs_vectors:
            raise ConfigError("model.obs_film conditions the frame encoder of encoded observations (model.obs_vectors > 0)")
        if self.obs_vectors and not (self.slots > self.obs_len + 3 and 0 < self.obs_grid**2 <= self.obs_len):
            raise ConfigError(f"encoded observations need model.obs_len (got {self.obs_len}) cells of a model.obs_grid "
                              f"(got {self.obs_grid}) square grid inside a step of model.slots - 1 (got {self.slots - 1}) positions")
        if self.chunk < 0:
            raise ConfigError(f"model.chunk must be >= 0 (0 = automatic), got {self.chunk}")
        if self.ffn not in FFNS:
            raise ConfigError(f"model.ffn must be one of {', '.join(FFNS)}; got {self.ffn!r}")
        self._check_layers()
        if self.attention not in ("sdpa", "ring"):
            raise ConfigError(f"model.attention must be sdpa or ring, got {self.attention!r}")
        if self.attention == "ring" and (set(self.layer_kinds) != {"attn"} or self.dropout):
            raise ConfigError("model.attention=ring needs attention layers only (model.backbone=transformer) and "
                              f"model.dropout=0; got layers {','.join(dict.fromkeys(self.layer_kinds))}, dropout {self.dropout}")

    def _check_layers(self) -> None:
        """model.backbone and model.layers agree, and each mixer used accepts this config."""
        mixers = _mixers()
        kinds = self.layer_kinds  # validates the names in model.layers
        own = mixers.backbone_kind(self.backbone)
        if self.backbone == "hybrid" and not self.layers.strip():
            raise ConfigError(f"model.backbone=hybrid needs model.layers: {self.n_layer} comma-separated mixers "
                              f"from {', '.join(mixers.MIXERS)} (e.g. model.layers={','.join(['mamba'] * (self.n_layer - 1) + ['attn'])})")
        if own is not None and any(k != own for k in kinds):
            raise ConfigError(f"model.backbone={self.backbone} has only '{own}' layers, got model.layers={self.layers}; "
                              f"use model.backbone=hybrid to mix mixers")
        for kind in dict.fromkeys(kinds):
            mixers.MIXERS[kind].check(self)

    @property
    def layer_kinds(self) -> list[str]:
        """The mixer of every layer: model.layers parsed, or n_layer times the backbone's own kind."""
        names = _mixers().MIXERS
        if not self.layers.strip():
            own = _mixers().backbone_kind(self.backbone)
            return [own] * self.n_layer if own else []
        kinds = [k.strip() for k in self.layers.split(",")]
        for k in kinds:
            if k not in names:
                close = difflib.get_close_matches(k, list(names), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"model.layers: unknown mixer {k!r}{hint}; choose from {', '.join(names)}")
        if len(kinds) != self.n_layer:
            raise ConfigError(f"model.layers names {len(kinds)} mixers but model.n_layer is {self.n_layer}; give one per layer")
        return kinds

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 64) * 64


OBJECTIVES = ("next", "masked", "combined")  # train.objective: the losses/ functions the text recipe trains on
MAX_THREADS = 4096


@dataclass
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 5000  # optimizer steps
    max_minutes: float = 0.0  # wall-clock budget; 0 = none. The LR schedule follows whichever budget ends first
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32 ; fp16 is refused on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_interval: int = 250  # steps between held-out evaluations (and checkpoints)
    eval_batches: int = 20
    log_interval: int = 10
    seed: int = 1337
    threads: int = 0  # torch CPU threads; 0 = OMP_NUM_THREADS if set, else all cores
    compile: bool = False  # torch.compile the model (costs 15-30 s at start on CPU)
    dist: str = "none"  # under torchrun: ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard); batch_size is the global batch
    objective: str = "next"  # next | masked (fill-mask, attending both ways) | combined (next + mask_alpha * masked); text recipe
    mask_alpha: float = 1.0  # combined: alpha of l + alpha * l_masked (the seed chapter's l_alpha; alpha = 1 as Izdebski et al. 2023)
    mask_rate: float = 0.15  # masked, combined: share of each window's tokens replaced by <mask> (BERT's 15%)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not 0.0 <= self.mask_alpha < float("inf"):
            raise ConfigError(f"train.mask_alpha must be a finite number >= 0, got {self.mask_alpha}")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"train.mask_rate must be between 0 and 1, got {self.mask_rate}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.max_minutes < 0:
            raise ConfigError(f"train.max_minutes must be >= 0, got {self.max_minutes}")
        if self.dist not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"train.dist must be one of none, ddp, fsdp; got {self.dist!r}")
        if self.precision not in ("auto", "bf16", "fp32", "fp16"):
            raise ConfigError(f"train.precision must be one of auto, bf16, fp32, fp16; got {self.precision!r}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"train.threads must be between 0 (all cores) and {MAX_THREADS}, got {self.threads}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.warmup_steps, train.grad_clip and train.weight_decay must be >= 0, got "
                              f"{self.warmup_steps}, {self.grad_clip}, {self.weight_decay}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")


@dataclass
class LoRAConfig:
    """LoRA adapters (worldloom.adapters.lora) for the tuning recipes: rank 0 trains every weight."""

    rank: int = 0  # 0 = full fine-tuning; >= 1: frozen base + trainable low-rank adapters of this rank
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    targets: str = "qkv,proj,gate_up,down,qkvg,in_proj,out_proj"  # glob patterns on layer names (qkv, mlp.*, blocks.0.attn.proj)

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0 = full fine-tuning), got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TuneConfig:
    """What a tuned run (recipes sft, dpo, orpo, reward) keeps of where it came from and how it reads rows."""

    base: str = ""  # the run folder it was tuned from ("" = not a tuned run); set by `worldloom tune`
    base_hash: str = ""  # sha256 of the base's checkpoint weights, checked whenever the run is loaded
    prompt_format: str = "Q: {prompt}\nA: "  # the chat template: a prompt as the model reads it
    stop: str = "\n"  # a response ends with this text (sampling stops there)
    val_fraction: float = 0.05  # rows held out for the validation loss
    eval_rows: int = 200  # held-out rows scored by the checker at the end of a run (0 = off)

    def __post_init__(self):
        if "{prompt}" not in self.prompt_format:
            raise ConfigError(f"tune.prompt_format must contain {{prompt}}, got {self.prompt_format!r}")
        if not self.stop:
            raise ConfigError("tune.stop is empty; give the text that ends a response (default a newline)")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"tune.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.eval_rows < 0:
            raise ConfigError(f"tune.eval_rows must be >= 0, got {self.eval_rows}")


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL to the reference (sigmoid) / 1/(2 beta) target margin (ipo)
    loss: str = "sigmoid"  # sigmoid (DPO, Rafailov et al. 2023) | ipo (Azar et al. 2023)
    sft_coef: float = 0.0  # + this x the chosen responses' cross-entropy (RPO, Pang et al. 2024); 0 = plain DPO

    def __post_init__(self):
        if self.sft_coef < 0:
            raise ConfigError(f"dpo.sft_coef must be >= 0, got {self.sft_coef}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"dpo.loss must be sigmoid or ipo, got {self.loss!r}")


@dataclass
class ORPOConfig:
    lam: float = 0.1  # weight of the odds-ratio term beside the SFT loss (Hong et al. 2024's lambda)

    def __post_init__(self):
        if self.lam < 0:
            raise ConfigError(f"orpo.lam must be >= 0, got {self.lam}")


@dataclass
class DistillConfig:
    """A base run's own generations to learn from (self-distillation): what Medusa heads (``medusa.*``)
    and a draft model (``draft.*``) are trained on. Prompts are cut from the base's training text."""

    section: ClassVar[str] = "distill"
    samples: int = 512  # the base model's own generations to train on (prompts cut from its training text)
    prompt: int = 16  # tokens of each prompt
    length: int = 96  # tokens generated after each prompt (at most model.context + 1 - prompt are used)
    temperature: float = 0.0  # of those generations: 0 = greedy (the decoding they speed up), > 0 sampled
    val_fraction: float = 0.1  # generations held out (loss, top-1 agreement with the base)
    seed: int = 0  # prompt places and sampling

    def __post_init__(self):
        n = self.section
        if self.samples < 2 or self.prompt < 1 or self.length < 2:
            raise ConfigError(f"{n}.samples must be >= 2, {n}.prompt >= 1 and {n}.length >= 2; got "
                              f"{self.samples}, {self.prompt}, {self.length}")
        if self.temperature < 0:
            raise ConfigError(f"{n}.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"{n}.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class MedusaConfig(DistillConfig):
    """Medusa heads (recipe medusa: `worldloom tune medusa RUN heads=K`) and their self-distillation data."""

    section: ClassVar[str] = "medusa"
    heads: int = 4  # extra heads: head k (1..K) predicts the token k+1 positions after the model's own next token

    def __post_init__(self):
        if not 1 <= self.heads <= 16:
            raise ConfigError(f"medusa.heads must be from 1 to 16, got {self.heads}")
        super().__post_init__()


@dataclass
class DraftConfig(DistillConfig):
    """A draft model distilled from a target run (recipe draft: `worldloom tune draft RUN model.n_layer=2 ...`)."""

    section: ClassVar[str] = "draft"
    samples: int = 2048
    length: int = 128
    init: str = ""  # a text run with the target's tokenizer and this run's model settings to start from ("" = fresh weights)


QUANT_BITS = (0.0, 8.0, 1.58)  # quant.bits: full precision, weight-only int8, ternary (BitNet b1.58)


@dataclass
class QuantConfig:
    """A quantised run (worldloom.quant, `worldloom quantize`): what its weights are stored as."""

    bits: float = 0.0  # 0 = full precision | 8 = weight-only int8 (no training) | 1.58 = ternary (BitNet b1.58, QAT)
    # how the quantised layers multiply: exact (int8pack: weight-only int8, exact ternary sums) | fbgemm
    # (PyTorch's dynamic quantised linear: activations to 8 bits per call; faster at batch 1, not exact)
    kernel: str = "exact"

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise ConfigError(f"quant.bits must be 8 (weight-only int8) or 1.58 (ternary), or 0 (full precision); got {self.bits:g}")
        if self.kernel not in ("exact", "fbgemm"):
            raise ConfigError(f"quant.kernel must be exact or fbgemm, got {self.kernel!r}")


VISION_QUANTIZERS = ("vq", "fsq")
VISION_POLICIES = ("random", "bot")


@dataclass
class TalkConfig:
    """A world model that talks (recipe talk, preset babyai-talk; worldloom.talk, docs/talk.md)."""

    fraction: float = 0.5  # share of packed segments that are talk segments (the rest: whole episodes)
    draw: float = 0.3  # share of talk segments that draw a view from its caption (the rest read a view: caption + questions)
    weight_text: float = 1.0  # loss weight of caption and answer tokens
    weight_draw: float = 1.0  # loss weight of a drawn view's tokens
    held_out: str = "purple key,yellow box"  # colour-object pairs no training text names (comma-separated)
    eval_views: int = 100  # held-out views scored by eval (and as many views showing a held-out pair)
    view: str = "tokens"  # how a read segment shows its view: tokens (the stream's 50 ids) or prefix (prefix.*: LLaVA-style vectors)

    def __post_init__(self):
        if self.view not in ("tokens", "prefix"):
            raise ConfigError(f"talk.view must be tokens or prefix, got {self.view!r}")
        for name in ("fraction", "draw"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"talk.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("weight_text", "weight_draw"):
            if getattr(self, name) < 0:
                raise ConfigError(f"talk.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.eval_views <= 100000:
            raise ConfigError(f"talk.eval_views must be in 1..100000, got {self.eval_views}")
        from .talk.text import check_pairs

        try:
            check_pairs(self.held_out)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class VisionConfig:
    """An image tokenizer (recipe image-tokenizer, `worldloom train tokenizer-vq`): the autoencoder, its
    bottleneck and the frames it learns from (worldloom.vision)."""

    quantizer: str = "vq"  # vq: nearest code of an EMA codebook (commitment loss, dead-code restarts) | fsq: finite scalar quantisation
    codebook: int = 512  # vq: codes
    code_dim: int = 32  # vq: size of a code vector
    fsq_levels: str = "8,5,5,5"  # fsq: values per channel (the codebook is their product: 1000)
    channels: int = 64  # convolution channels
    downsample: int = 8  # pixels per code along each side (a power of 2): 64x64 frames, 8 -> 8x8 codes
    beta: float = 0.25  # vq: commitment loss weight
    ema_decay: float = 0.99  # vq: codebook EMA
    dead_code: float = 0.03  # vq: a code whose EMA count per batch falls below this is restarted at a batch vector
    rare_weight: float = 0.0  # reconstruction loss: each pixel weighed by (how many pixels of the batch share its exact colour)^-rare_weight, mean 1 (0: plain MSE)
    frames: int = 20000  # training frames collected from env.id (held-out frames come from other seeds)
    val_frames: int = 1000
    policy: str = "random"  # how the frames are played: random actions | bot (BabyAI levels: the BabyAI bot, mostly)
    minutes: float = 4.0  # a pixel world run's tokenizer stage (stream.tokenizer empty): its training budget in minutes
    max_steps: int = 0  # ... and in steps (0: minutes only); a tokenizer-vq run itself uses train.max_minutes / train.max_steps

    def levels(self) -> list[int]:
        return [int(x) for x in self.fsq_levels.split(",")]

    def __post_init__(self):
        if self.quantizer not in VISION_QUANTIZERS:
            raise ConfigError(f"vision.quantizer must be one of {', '.join(VISION_QUANTIZERS)}, got {self.quantizer!r}")
        if self.policy not in VISION_POLICIES:
            raise ConfigError(f"vision.policy must be one of {', '.join(VISION_POLICIES)}, got {self.policy!r}")
        if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", self.fsq_levels) or min(self.levels()) < 2 or len(self.levels()) > 8:
            raise ConfigError(f"vision.fsq_levels must be 1 to 8 integers >= 2 separated by commas (e.g. 8,5,5,5), got {self.fsq_levels!r}")
        if self.downsample < 1 or self.downsample & (self.downsample - 1) or self.downsample > 64:
            raise ConfigError(f"vision.downsample must be a power of 2 from 1 to 64, got {self.downsample}")
        if not 2 <= self.codebook <= 65536 or not 1 <= self.code_dim <= 1024 or not 1 <= self.channels <= 1024:
            raise ConfigError(f"vision.codebook must be in 2..65536, vision.code_dim and vision.channels in 1..1024; got "
                              f"{self.codebook}, {self.code_dim}, {self.channels}")
        if not 0 <= self.ema_decay < 1 or self.beta < 0 or self.dead_code < 0:
            raise ConfigError("vision.ema_decay must be in [0, 1), vision.beta and vision.dead_code >= 0")
        if not 0 <= self.rare_weight <= 2:
            raise ConfigError(f"vision.rare_weight must be in [0, 2] (0: plain MSE; 0.5: rare colours weigh more), got {self.rare_weight}")
        if self.frames < 1 or self.val_frames < 1:
            raise ConfigError(f"vision.frames and vision.val_frames must be >= 1, got {self.frames}, {self.val_frames}")
        if not (0 <= self.minutes <= 10_000 and 0 <= self.max_steps <= 10**9) or not (self.minutes or self.max_steps):
            raise ConfigError(f"vision.minutes (0..10000) or vision.max_steps (>= 0) must give the tokenizer stage a budget, "
                              f"got {self.minutes} and {self.max_steps}")


BIND_MODALITIES = ("view", "text", "actions")


@dataclass
class AudioConfig:
    """Speech as tokens (issue 16 req 7, worldloom.audio): utterances spoken by espeak-ng, log-mel frames,
    the quantiser over them (recipe audio-tokenizer) and the transcription recipe (listen)."""

    sample_rate: int = 22050  # espeak-ng's own rate
    n_fft: int = 1024
    hop: int = 256  # samples between mel frames (11.6 ms at 22050 Hz)
    n_mels: int = 64
    fmax: float = 8000.0
    stack: int = 4  # mel frames per code (a power of 2): 4 -> one token per 46 ms
    codebook: int = 512
    code_dim: int = 32
    channels: int = 128
    beta: float = 0.25  # commitment loss weight
    ema_decay: float = 0.99
    dead_code: float = 0.03
    crop: int = 64  # training clip length in mel frames (a multiple of stack)
    utterances: int = 2000  # training utterances (missions spoken by random training voices)
    val_utterances: int = 200  # held-out utterances: other seeds, training voices
    held_out_voices: str = "en-029,f4"  # voice languages or variants never spoken in training (a separate held-out set)
    griffin_lim: int = 32  # Griffin-Lim iterations of the vocoder
    tokenizer: str = ""  # listen and world runs with stream.spoken > 0: an audio-tokenizer run folder; empty: trained first into <run>/tokenizer (listen) or <run>/audio-tokenizer (world)
    tokenizer_steps: int = 1500  # listen, stream.spoken: the tokenizer stage's train.max_steps
    speak: float = 0.5  # listen: share of training rows that speak (text -> audio tokens); the rest transcribe
    eval_utterances: int = 200  # listen: utterances per evaluation set

    def held_out(self) -> set[str]:
        return {x.strip() for x in self.held_out_voices.split(",") if x.strip()}

    def __post_init__(self):
        if not 8000 <= self.sample_rate <= 48000 or self.hop < 16 or self.n_fft < self.hop or self.n_fft & (self.n_fft - 1):
            raise ConfigError(f"audio.sample_rate must be in 8000..48000, audio.n_fft a power of 2 >= audio.hop >= 16; got "
                              f"{self.sample_rate}, {self.n_fft}, {self.hop}")
        if not 8 <= self.n_mels <= 256 or not 0 < self.fmax <= self.sample_rate / 2:
            raise ConfigError(f"audio.n_mels must be in 8..256 and audio.fmax in (0, sample_rate/2]; got {self.n_mels}, {self.fmax}")
        if self.stack < 1 or self.stack & (self.stack - 1) or self.stack > 32 or self.crop < self.stack or self.crop % self.stack:
            raise ConfigError(f"audio.stack must be a power of 2 up to 32 and audio.crop a multiple of it; got {self.stack}, {self.crop}")
        if not 2 <= self.codebook <= 65536 or not 1 <= self.code_dim <= 1024 or not 1 <= self.channels <= 1024:
            raise ConfigError(f"audio.codebook must be in 2..65536, audio.code_dim and audio.channels in 1..1024; got "
                              f"{self.codebook}, {self.code_dim}, {self.channels}")
        if not 0 <= self.ema_decay < 1 or self.beta < 0 or self.dead_code < 0:
            raise ConfigError("audio.ema_decay must be in [0, 1), audio.beta and audio.dead_code >= 0")
        if not 1 <= self.utterances <= 10**6 or not 1 <= self.val_utterances <= 10**6 or not 1 <= self.griffin_lim <= 1000:
            raise ConfigError(f"audio.utterances and audio.val_utterances must be in 1..10^6, audio.griffin_lim in 1..1000; "
                              f"got {self.utterances}, {self.val_utterances}, {self.griffin_lim}")
        if not 1 <= self.tokenizer_steps <= 10**9 or not 0 <= self.speak <= 1 or not 1 <= self.eval_utterances <= 10**6:
            raise ConfigError(f"audio.tokenizer_steps must be >= 1, audio.speak in [0, 1], audio.eval_utterances in 1..10^6; "
                              f"got {self.tokenizer_steps}, {self.speak}, {self.eval_utterances}")


@dataclass
class PrefixConfig:
    """A vision prefix for the talk model (talk.view=prefix; worldloom.talk.prefix, docs/talk.md): a small CNN over
    the rendered RGB view, its vectors projected by an MLP into the backbone's embedding space, trained first with
    the backbone frozen (stage 1), then jointly."""

    tile: int = 8  # pixels per view cell of the rendered view (MiniGrid's renderer; 8 is the rgb: envs' size)
    grid: int = 7  # the encoder's output: grid x grid vectors (7: one per view cell; fewer: pooled)
    channels: int = 64  # the CNN's width
    hidden: int = 256  # the projector MLP's hidden width
    # optimizer steps with the backbone frozen (only encoder + projector learn), then jointly; > 0 needs prefix.base
    # (a trained backbone to align to, as LLaVA's stage 1 has): freezing a backbone at its random init teaches nothing
    stage1_steps: int = 200
    base: str = ""  # a talk run (talk.view=tokens) whose model and stream the backbone starts from; "": its own init

    def __post_init__(self):
        for name in ("tile", "grid", "channels", "hidden"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ConfigError(f"prefix.{name} must be in 1..4096, got {getattr(self, name)}")
        if self.stage1_steps < 0:
            raise ConfigError(f"prefix.stage1_steps must be >= 0, got {self.stage1_steps}")


@dataclass
class BindConfig:
    """Modality binding (recipe bind, worldloom.bind): items seen as a view, a caption and an action
    sequence, embedded into one space by contrastive pairs with text as the hub."""

    items: int = 20000  # training items from env.id levels (seeds data.seed + i)
    val_items: int = 1000  # held-out items, from seeds never used in training (data.seed + 10**6 + i)
    per_level: int = 4  # items taken from one level (its first state and a short random walk)
    pairs: str = "view-text,actions-text"  # the pairs trained together; retrieval is measured on every pair
    dim: int = 128  # the shared embedding size
    channels: int = 64  # the view encoder's convolution channels
    view: int = 7  # the egocentric view's side (MiniGrid: 7)
    text_len: int = 16  # words of a caption segment (longer captions are refused)
    action_len: int = 12  # actions of a path segment (items with longer paths are skipped)
    temperature: float = 0.07  # initial softmax temperature (learned)

    def pair_list(self) -> list[tuple[str, ...]]:
        """'view-text,actions-text' -> [('view', 'text'), ('actions', 'text')]."""
        return [tuple(x.strip() for x in p.split("-")) for p in self.pairs.split(",") if p.strip()]

    def __post_init__(self):
        for name in ("items", "val_items", "per_level", "dim", "channels", "view", "text_len", "action_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"bind.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.temperature <= 1.0:
            raise ConfigError(f"bind.temperature must be in (0, 1], got {self.temperature}")
        pairs = self.pair_list()
        bad = [p for p in pairs if len(p) != 2 or p[0] == p[1] or not set(p) <= set(BIND_MODALITIES)]
        if not pairs or bad:
            raise ConfigError(f"bind.pairs must be comma-separated pairs of two of {', '.join(BIND_MODALITIES)} "
                              f"(e.g. view-text,actions-text), got {self.pairs!r}")


STREAM_DERIVED = ("slots", "period", "frame_tokens", "slot_grid", "obs_vectors", "obs_len", "obs_grid")  # model fields the world stream layout sets
NAME_MAX = 255  # bytes in one file name (Linux, macOS)


def check_run_name(name: str) -> None:
    """A run name is one path component: the run folder is always directly inside out_dir."""
    seps = {"/", os.sep, os.altsep or "/", "\\"}
    if not name.strip() or name in (".", ".."):
        raise ConfigError(f"name must name a run folder inside out_dir (e.g. name=quick), got {name!r}")
    if any(sep in name for sep in seps):
        raise ConfigError(f"name must be one folder name without '/' or '\\' (set out_dir for the parent folder), got {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise ConfigError(f"name is longer than {NAME_MAX} bytes, too long for a folder name")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    recipe: str = "text"  # a name in worldloom.recipes: text (a language model on a text file), world (collect, train a world model + policy)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    medusa: MedusaConfig = field(default_factory=MedusaConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    talk: TalkConfig = field(default_factory=TalkConfig)
    bind: BindConfig = field(default_factory=BindConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)

    def __post_init__(self):
        from .recipes import check_recipe, get_recipe

        check_recipe(self.recipe)
        _check_prefix(self)
        if self.train.objective != "next":
            _check_objective(self)
        check_run_name(self.name)
        if self.stream.spoken and not get_recipe(self.recipe).spoken:
            raise ConfigError(f"stream.spoken={self.stream.spoken:g} is for a world run (recipe world: worldloom train babyai-spoken); "
                              f"a {self.recipe} run has no spoken missions")
        derived = [k for k in STREAM_DERIVED if getattr(self.model, k)]
        if derived and derived[0] not in get_recipe(self.recipe).model_fields:
            raise ConfigError(f"model.{derived[0]} is set from a world-model stream; a {self.recipe} run has none "
                              f"(drop model.{derived[0]}=...)")
        if not self.out_dir.strip():
            raise ConfigError("out_dir is empty; give the folder that holds run folders (default runs)")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _check_prefix(cfg: RunConfig) -> None:
    """prefix.* settings and talk.view=prefix belong to a recipe that reads views as a prefix (the talk recipe)."""
    from .recipes import get_recipe

    has_prefix = get_recipe(cfg.recipe).vision_prefix
    if cfg.talk.view == "prefix" and not has_prefix:
        raise ConfigError(f"talk.view=prefix is for a talk run (worldloom train babyai-talk-prefix); a {cfg.recipe} run has no talk")
    if cfg.talk.view == "prefix" and cfg.prefix.stage1_steps and not cfg.prefix.base:
        raise ConfigError(f"prefix.stage1_steps={cfg.prefix.stage1_steps} freezes the backbone, which without prefix.base is "
                          "its random init: give prefix.base=TALK_RUN (a trained babyai-talk run) or prefix.stage1_steps=0")
    if cfg.prefix != PrefixConfig() and cfg.talk.view != "prefix":
        what = f"a {cfg.recipe} run" if not has_prefix else f"a {cfg.recipe} run with talk.view=tokens"
        raise ConfigError(f"prefix.* settings are for a talk run with talk.view=prefix; {what} has no vision prefix "
                          "(drop them, or train babyai-talk-prefix)")


def _check_objective(cfg: RunConfig) -> None:
    """A masked or combined objective needs a recipe that trains it and layers that can attend both ways."""
    from .recipes import get_recipe

    objective = cfg.train.objective
    if objective not in get_recipe(cfg.recipe).objectives:
        raise ConfigError(f"train.objective={objective} is not available to recipe {cfg.recipe} "
                          f"(it trains {', '.join(get_recipe(cfg.recipe).objectives)})")
    one_way = sorted({k for k in cfg.model.layer_kinds if not _mixers().MIXERS[k].bidirectional})
    if one_way:
        raise ConfigError(f"train.objective={objective} needs a bidirectional pass, which {', '.join(one_way)} layers "
                          "cannot make (their state only runs forward); use attention layers (model.backbone=transformer)")
    if cfg.model.attention == "ring":
        raise ConfigError(f"train.objective={objective} runs a bidirectional pass, which model.attention=ring does not "
                          "split over ranks yet; use model.attention=sdpa")


# ---------------------------------------------------------------- dict <-> dataclass


def _field_types(cls) -> dict[str, Any]:
    """The types of a config dataclass's fields (class constants such as ``section`` are not fields)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _check_value(path: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to type `tp`, or raise a one-line ConfigError."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of keys, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=path + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _bounded_int(path, value)
    elif tp is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 3e-4, without a dot, as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite_float(path, value)
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            if "\x00" in value:
                raise ConfigError(f"{path} must not contain a NUL character, got {value!r}")
            return value
    else:  # pragma: no cover - a field type this module does not know is a bug here
        raise TypeError(f"unsupported config field type {tp!r} at {path}")
    raise ConfigError(f"{path} must be {tp.__name__}, got {type(value).__name__} {value!r}")


INT_LIMIT = 2**63 - 1  # every config integer must fit a 64-bit index (torch sizes, seeds, steps)


# Counts that cost work or memory before any size check can run (a list per layer, a process per worker).
UPPER = {"model.n_layer": 1024, "model.moe_experts": 1024, "data.workers": 256, "eval.envs": 4096}


def _bounded_int(path: str, value: int) -> int:
    if not -INT_LIMIT <= value <= INT_LIMIT:
        raise ConfigError(f"{path}={str(value)[:24]}... is out of range: config integers lie within ±(2**63-1)")
    if value > UPPER.get(path, INT_LIMIT):
        raise ConfigError(f"{path}={value} is beyond the supported {UPPER[path]:,}")
    return value


def _finite_float(path: str, value: float) -> float:
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        raise ConfigError(f"{path} is too large to be a number, got {str(value)[:30]}...") from None
    if not math.isfinite(value):
        raise ConfigError(f"{path} must be a finite number, got {value}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    types_ = _field_types(cls)
    if cls is ModelConfig:
        data = upgrade_model_keys(data)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            valid = sorted(types_)
            close = difflib.get_close_matches(key, valid, n=1) or difflib.get_close_matches(key, _nested_keys(types_), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} valid keys under '{prefix or '.'}': {', '.join(valid)}")
        kwargs[key] = _check_value(prefix + key, value, types_[key])
    return cls(**kwargs)


def _nested_keys(types_: dict) -> list[str]:
    """'group.key' for the keys of the sub-configs among these fields (to suggest model.moe.top_k for moe_topk)."""
    return [f"{name}.{sub}" for name, tp in types_.items() if dataclasses.is_dataclass(tp) for sub in _field_types(tp)]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- overrides and presets


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.n_layer=4' -> (['model', 'n_layer'], 4). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. model.n_layer=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `key.sub=value` in a nested dict (validation happens later, in from_dict)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {'.'.join(keys)}: '{k}' is a value, not a group of keys")
            node = child
        node[keys[-1]] = value
    return data


def preset_names() -> list[str]:
    folder = resources.files("worldloom") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} available: {', '.join(names)}")
    text = (resources.files("worldloom") / "presets" / f"{name}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    data.pop("description", None)
    data.setdefault("name", name)
    return data


def preset_description(name: str) -> str:
    text = (resources.files("worldloom") / "presets" / f"{name}.yaml").read_text()
    return str((yaml.safe_load(text) or {}).get("description", "")).strip()


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return data


def build_config(preset: str | None, overrides: list[str]) -> RunConfig:
    data = load_preset(preset) if preset else {}
    apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


def save_yaml(data: dict, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
