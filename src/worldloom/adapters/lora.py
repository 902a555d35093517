"""LoRA (Hu et al. 2021): a frozen linear layer W with a trainable low-rank update beside it,

    y = W x + (alpha / r) · B A x,        A (r, in) random, B (out, r) zero at the start,

so an adapted model starts exactly where its base was. ``apply_lora`` wraps the ``nn.Linear``
layers whose names match ``lora.targets`` (comma-separated glob patterns, matched against
every dotted suffix of a module's name: ``qkv``, ``mlp.*``, ``blocks.0.attn.proj``) in a
``LoRALinear`` and freezes every weight that is not an adapter's.

Fused projections adapt per slice, as PEFT adapts separate layers: a module that fuses several
projections into one ``nn.Linear`` says so with ``fused_slices()`` (attention's ``qkv`` ->
q, k, v widths; SwiGLU's ``gate_up`` -> gate, up), and each slice gets its own A and B. That
is what lets an adapter travel to and from a Llama layout's separate q/k/v and gate/up layers.

One ``LoRALinear`` holds any number of named adapters; ``set_active`` picks which ones add
their update (several at once add up), ``disabled`` is the base alone (the frozen reference of
DPO and PPO comes for free), ``merge``/``unmerge`` fold the active updates into W and back.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math

import torch
from torch import nn

from ..config import LoRAConfig
from ..errors import ConfigError

DEFAULT_TARGETS = LoRAConfig.targets  # the config default: every projection of the shipped mixers
NEVER = ("head",)  # the output head is tied to the embedding in most runs: never adapted


class LoRAAdapter(nn.Module):
    """One adapter of one layer: an (A, B) pair per output slice."""

    def __init__(self, in_features: int, slices: tuple[int, ...], rank: int, alpha: float, dropout: float):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.A = nn.ParameterList(nn.Parameter(torch.empty(rank, in_features)) for _ in slices)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(width, rank)) for width in slices)
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and PEFT) start A
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> the update (..., out): the slices' B_s A_s x side by side."""
        x = self.drop(x)
        return torch.cat([(x @ a.t()) @ b.t() for a, b in zip(self.A, self.B)], dim=-1) * self.scale

    def delta(self) -> torch.Tensor:
        """The update as a weight (out, in): B_s A_s stacked along the output."""
        return torch.cat([b @ a for a, b in zip(self.A, self.B)], dim=0) * self.scale


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``, its weights under their old names plus ``base.``) and named adapters."""

    def __init__(self, base: nn.Linear, slices: tuple[int, ...] | None = None):
        super().__init__()
        self.base = base
        self.slices = tuple(slices) if slices else (base.out_features,)
        if sum(self.slices) != base.out_features:
            raise ValueError(f"slices {self.slices} do not add up to the layer's {base.out_features} outputs")
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # adapters whose update is folded into base.weight now
        self.off = False  # True inside `disabled`: the base alone

    def add(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        self.adapters[name] = LoRAAdapter(self.base.in_features, self.slices, rank, alpha, dropout)
        self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.off and self.merged:
            raise RuntimeError("cannot disable merged adapters; unmerge first")
        y = self.base(x)
        if self.off:
            return y
        for name in self.active:
            if name not in self.merged:
                y = y + self.adapters[name](x).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        for name in self.active:
            if name not in self.merged:
                self.base.weight += self.adapters[name].delta().to(self.base.weight.dtype)
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            self.base.weight -= self.adapters[self.merged.pop()].delta().to(self.base.weight.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _matches(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def target_names(model: nn.Module, targets: str) -> list[str]:
    """Names of the ``nn.Linear`` layers (never the output head) that ``targets`` picks; ConfigError if none."""
    patterns = [p.strip() for p in targets.split(",") if p.strip()]
    if not patterns:
        raise ConfigError("lora.targets is empty; name the linear layers to adapt, e.g. lora.targets=qkv,proj")
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and n not in NEVER
              and not n.endswith(".base")]
    picked = [n for n in linear if _matches(n, patterns)]
    if not picked:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"lora.targets={targets!r} matches no linear layer of this model; its layers end in: {', '.join(kinds)}")
    return picked


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets: str = DEFAULT_TARGETS,
               name: str = "default", freeze: bool = True) -> list[str]:
    """Add adapter ``name`` to the layers ``targets`` picks (wrapping them the first time); with ``freeze``,
    every parameter but the adapters' stops training. Returns the adapted layers' names."""
    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1 to add an adapter, got {rank}")
    if alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout}")
    picked = target_names(model, targets)
    for full in picked:
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if not isinstance(layer, LoRALinear):
            fused = getattr(parent, "fused_slices", None)
            layer = LoRALinear(layer, (fused() or {}).get(child) if fused else None)
            setattr(parent, child, layer)
        if name in layer.adapters:
            raise ConfigError(f"layer {full} already has an adapter named {name!r}")
        layer.add(name, rank, alpha, dropout)
    if freeze:
        for pname, p in model.named_parameters():
            p.requires_grad_(".adapters." in pname)
    return picked


def set_active(model: nn.Module, names: list[str]) -> None:
    """Make ``names`` the adapters that add their update, in every adapted layer (merged ones must be unmerged)."""
    for layer in lora_layers(model).values():
        if layer.merged:
            raise RuntimeError("unmerge the adapters before changing which are active")
        unknown = [n for n in names if n not in layer.adapters]
        if unknown:
            raise ConfigError(f"no adapter named {unknown[0]!r}; this model has {', '.join(layer.adapters)}")
        layer.active = list(names)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside: the base model alone (every adapter off). The frozen reference of DPO/PPO with LoRA."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.off = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.off = False


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def adapter_state(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their names in the model (only adapter ``name``'s if given)."""
    key = f".adapters.{name}." if name else ".adapters."
    return {k: v for k, v in model.state_dict().items() if key in k}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with the active adapters folded in, under the plain model's names
    (``...qkv.base.weight`` -> ``...qkv.weight``); the model itself is left as it was."""
    return _plain_state(model, fold=True)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's weights under the plain model's names: no adapter's update in them
    (merged ones are taken out again); the model itself is left as it was."""
    return _plain_state(model, fold=False)


@torch.no_grad()
def _plain_state(model: nn.Module, fold: bool) -> dict[str, torch.Tensor]:
    out = {}
    layers = lora_layers(model)
    for k, v in model.state_dict().items():
        if ".adapters." in k:
            continue
        owner, _, leaf = k.rpartition(".base.")
        if owner in layers and leaf == "weight":
            layer = layers[owner]
            w = v.clone()
            for name in layer.active if fold else []:
                if name not in layer.merged:
                    w += layer.adapters[name].delta().to(w.dtype)
            for name in [] if fold else layer.merged:
                w -= layer.adapters[name].delta().to(w.dtype)
            out[f"{owner}.weight"] = w
        elif owner in layers:
            out[f"{owner}.{leaf}"] = v
        else:
            out[k] = v
    return out


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
