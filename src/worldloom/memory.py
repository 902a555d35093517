"""Will a run fit? The memory it needs, estimated before anything is allocated.

A size typed by mistake (``model.d_model=1000000``, ``train.batch_size=100000000``) would
otherwise end in an allocator traceback minutes later, or in the machine swapping. The
estimate counts parameters exactly (the model is built on PyTorch's ``meta`` device, which
allocates nothing: one and two layers of each mixer kind, so a huge ``model.n_layer``
costs nothing to check) and activations roughly; a run is refused only when the estimate
exceeds all of the machine's memory, so a false refusal needs an estimate that is several
times too high.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .errors import ConfigError

GIB = 2**30
PARAM_BYTES = 16  # fp32 weight + gradient + AdamW's two moments
FLOAT = 4


def machine_bytes(device: torch.device) -> int | None:
    """All memory of the device (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _count(mc) -> int:
    """Parameters and buffers of a model with config `mc`, built on the meta device."""
    from .model import LWM

    with torch.device("meta"):
        model = LWM(mc)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def count_elements(mc) -> int:
    """Parameters + buffers of the model of `mc`: base + one layer's worth per layer, by mixer kind."""
    kinds = mc.layer_kinds
    total = None
    for kind in dict.fromkeys(kinds):  # one pair of meta builds per distinct mixer kind
        one = _count(dataclasses.replace(mc, backbone="hybrid", n_layer=1, layers=kind))
        two = _count(dataclasses.replace(mc, backbone="hybrid", n_layer=2, layers=f"{kind},{kind}"))
        total = (one - (two - one) if total is None else total) + (two - one) * kinds.count(kind)
    return total or 0


def activation_bytes(mc, batch_size: int) -> int:
    """Rough: what one micro-batch keeps for the backward pass, per token and layer, plus the logits."""
    tokens = batch_size * mc.context
    expand = max(1, getattr(mc, "mamba_expand", 1)) if set(mc.layer_kinds) - {"attn"} else 1
    per_layer = 24 * mc.d_model * expand + 3 * mc.ff_dim  # residual, norms, q/k/v, mixer and FFN inner states
    return FLOAT * tokens * (mc.n_layer * per_layer + 3 * max(mc.vocab_size, 1))  # logits, softmax, their gradient


def check_fits(cfg, device: torch.device) -> None:
    """ConfigError (one line, with the figures) when the run cannot fit in the device's memory."""
    have = machine_bytes(device)
    if not have:
        return
    mc = cfg.model
    params = PARAM_BYTES * count_elements(mc)
    acts = activation_bytes(mc, cfg.train.batch_size)
    if params + acts > have:
        raise ConfigError(
            f"this run needs about {(params + acts) / GIB:,.1f} GiB ({params / GIB:,.1f} GiB of weights, gradients and "
            f"optimizer state; {acts / GIB:,.1f} GiB of activations) but the {device.type} has {have / GIB:,.1f} GiB; "
            f"use a smaller model.d_model / model.n_layer or train.batch_size")
