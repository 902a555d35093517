"""The PEFT half of `worldloom export hf` of a LoRA run: its adapter under Llama layer names.

worldloom adapts fused layers per slice, so each slice's (A, B) is exactly the pair PEFT keeps
for one separate Llama layer::

    backbone.blocks.{i}.attn.qkv     slices 0, 1, 2 -> model.layers.{i}.self_attn.q_proj, k_proj, v_proj
    backbone.blocks.{i}.attn.proj                   -> model.layers.{i}.self_attn.o_proj
    backbone.blocks.{i}.mlp.gate_up  slices 0, 1    -> model.layers.{i}.mlp.gate_proj, up_proj
    backbone.blocks.{i}.mlp.down                    -> model.layers.{i}.mlp.down_proj

Tensors are saved under PEFT's names (``base_model.model.<layer>.lora_A.weight``, A (r, in);
``...lora_B.weight``, B (out, r)) and PEFT's scale is ``lora_alpha / r``, worldloom's too.
``target_modules`` lists the short Llama names when every layer is adapted in the same places,
else the full layer names, so PEFT adds adapters exactly where the file has weights.
"""

from __future__ import annotations

import re

import torch

from ..adapters.lora import lora_layers
from .hf import LLAMA_LAYERS, ExportError

LLAMA_SLICES = {k: v for k, v in LLAMA_LAYERS.items() if not k.endswith("norm")}  # the adaptable (linear) ones
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LlamaForCausalLM, whose blocks are model.layers.{i}
_BLOCK = re.compile(r"backbone\.blocks\.(\d+)\.(.+)")


def peft_adapter(model: torch.nn.Module, dropout: float, base_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of the model's one LoRA adapter."""
    name = _one_adapter(model)
    tensors, where, shape = {}, set(), set()
    for full, layer in lora_layers(model).items():
        block, llama = _llama_layers(full, len(layer.slices))
        ad = layer.adapters[name]
        shape.add((ad.rank, ad.alpha))
        for dst, a, b in zip(llama, ad.A, ad.B):
            key = f"{PEFT_PREFIX}model.layers.{block}.{dst}"
            tensors[f"{key}.lora_A.weight"] = a.detach().float().cpu()
            tensors[f"{key}.lora_B.weight"] = b.detach().float().cpu()
            where.add((block, dst))
    if len(shape) != 1:
        raise ExportError(f"the adapters differ in rank or alpha across layers ({sorted(shape)}); "
                                 "a PEFT adapter folder has one of each")
    (rank, alpha), = shape
    return adapter_config(rank, alpha, dropout, _targets(where, model.cfg.n_layer), base_path), tensors


def _one_adapter(model: torch.nn.Module) -> str:
    names = sorted({n for layer in lora_layers(model).values() for n in layer.active})
    if len(names) != 1:
        raise ExportError(f"a PEFT adapter folder holds one adapter; this model has {len(names)} active "
                                 f"({', '.join(names) or 'none'}); merge them first (worldloom lora merge)")
    return names[0]


def _llama_layers(full: str, n_slices: int) -> tuple[int, tuple[str, ...]]:
    """'backbone.blocks.3.attn.qkv' -> (3, (q_proj, k_proj, v_proj) names); ExportError when Llama has none."""
    m = _BLOCK.fullmatch(full)
    llama = LLAMA_SLICES.get(m.group(2)) if m else None
    if llama is None or len(llama) != n_slices:
        raise ExportError(f"the adapter on layer {full} has no Llama layer to go to (Llama adapts q/k/v/o_proj and "
                                 "gate/up/down_proj); tune with lora.targets=qkv,proj,gate_up,down")
    return int(m.group(1)), llama


def _targets(where: set[tuple[int, str]], n_layer: int) -> list[str]:
    """PEFT target_modules: short names when every block is adapted in the same places, else full names."""
    kinds = sorted({dst for _, dst in where})
    if where == {(i, dst) for i in range(n_layer) for dst in kinds}:
        return [dst.rsplit(".", 1)[-1] for dst in kinds]
    return [f"model.layers.{i}.{dst}" for i, dst in sorted(where)]


def adapter_config(rank: int, alpha: float, dropout: float, targets: list[str], base_path: str) -> dict:
    """adapter_config.json for peft.LoraConfig: plain LoRA, no bias, no rsLoRA/DoRA."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
