"""`worldloom export hf`: a run folder -> a `transformers.LlamaForCausalLM` folder.

The transformer backbone already uses the Llama layout (half-split rotary, q/k/v heads in
order, SwiGLU, RMSNorm, no biases), so the export renames tensors and splits the fused
``qkv`` and ``gate_up`` projections; no value is changed. The folder holds::

    config.json              LlamaConfig, written by hand (transformers is not needed here)
    model.safetensors        weights under Hugging Face names
    tokenizer.json           the run's tokenizer, unchanged
    tokenizer_config.json    PreTrainedTokenizerFast, no special tokens, no space clean-up

A LoRA run exports its base (the frozen weights, no update folded in) into that folder and its
adapter as a PEFT folder in ``adapter/`` (``export/peft.py``: ``adapter_config.json``,
``adapter_model.safetensors``); ``merged=True`` writes the weights with the adapter folded in
instead, as a plain Llama folder.

Every file is written atomically. ``config.json`` carries a ``worldloom_export`` key, which
is how a later export recognises a folder it may overwrite.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..adapters.lora import base_state, has_lora, merged_state
from ..errors import WorldloomError
from ..io import atomic_write_text, read_json, save_tensors, write_json
from ..run import LoadedRun

FORMAT = "worldloom-hf-export/1"
MARKER = "worldloom_export"
ADAPTER_DIR = "adapter"  # the PEFT adapter folder of a LoRA run's export


class ExportError(WorldloomError):
    """The run cannot be exported, or the output folder cannot be written."""


def export_hf(run: LoadedRun, out: Path, merged: bool = False) -> Path:
    """Write `run` as a Hugging Face Llama folder at `out` (a LoRA run: its base, and its adapter in
    `out/adapter` as a PEFT folder; with `merged`, the adapted weights as one plain model); return `out`."""
    out = Path(out)
    mc = run.cfg.model
    if mc.backbone != "transformer":
        raise ExportError(f"only the 'transformer' backbone can be exported to hf, this run uses '{mc.backbone}'")
    if mc.ffn != "swiglu":
        raise ExportError(f"only the SwiGLU feed-forward can be exported to hf (Llama), this run uses model.ffn={mc.ffn}")
    if run.cfg.quant.bits:
        raise ExportError(f"a quantised run (quant.bits={run.cfg.quant.bits:g}) has no Llama form in hf; export its base run "
                          f"({run.cfg.tune.base})")
    _check_out(out)
    adapter = None
    if has_lora(run.model) and not merged:
        from .peft import peft_adapter

        adapter = peft_adapter(run.model, run.cfg.lora.dropout, str(out.resolve()))
    tensors = hf_state_dict(run.model, merged_state(run.model) if merged else base_state(run.model))
    dtype = next(iter(tensors.values())).dtype
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_text(out / "tokenizer.json", run.tokenizer.tok.to_str())
        write_json(out / "tokenizer_config.json", tokenizer_config(mc.context))
        _write_adapter(out / ADAPTER_DIR, adapter)
        write_json(out / "config.json", llama_config(run, dtype))  # last: marks a complete export
    except OSError as e:
        raise ExportError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return out


def _write_adapter(folder: Path, adapter: tuple[dict, dict] | None) -> None:
    """The PEFT adapter folder, or none (one left by an earlier export of this folder is removed)."""
    if adapter is None:
        if folder.is_dir():
            shutil.rmtree(folder)
        return
    config, tensors = adapter
    folder.mkdir(exist_ok=True)
    save_tensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", config)


def _check_out(out: Path) -> None:
    """Refuse a file, or a non-empty folder that is not a previous worldloom export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    cfg = out / "config.json"
    ours = False
    if cfg.is_file():
        try:
            ours = MARKER in read_json(cfg)
        except WorldloomError:
            ours = False
    if not ours:
        raise ExportError(f"output folder {out} is not empty and is not a previous worldloom export; pick another folder")


LLAMA_LAYERS = {  # a block's worldloom weight -> the Llama weights it holds, in order (fused ones: along the output)
    "attn_norm": ("input_layernorm",),
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.proj": ("self_attn.o_proj",),
    "mlp_norm": ("post_attention_layernorm",),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down": ("mlp.down_proj",),
}


def fused_sizes(mc) -> dict[str, list[int]]:
    """Output rows of each Llama weight inside a fused worldloom one (a transformer ModelConfig `mc`)."""
    H, KV, D, F = mc.n_head, mc.kv_heads, mc.head_dim, mc.ff_dim
    return {"attn.qkv": [H * D, KV * D, KV * D], "mlp.gate_up": [F, F]}


def hf_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """worldloom LWM weights (the model's, or `sd` under a plain model's names) under
    `LlamaForCausalLM` names (lm_head left out when tied)."""
    cfg = model.cfg
    sd = model.state_dict() if sd is None else sd
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return sd[name].detach().cpu()

    out = {"model.embed_tokens.weight": take("embed.weight"), "model.norm.weight": take("norm.weight")}
    head = take("head.weight")
    if not cfg.tie_weights:
        out["lm_head.weight"] = head
    for i in range(cfg.n_layer):
        for ours, theirs in LLAMA_LAYERS.items():
            w = take(f"backbone.blocks.{i}.{ours}.weight")
            parts = w.split(fused_sizes(cfg)[ours], dim=0) if len(theirs) > 1 else (w,)
            out.update({f"model.layers.{i}.{t}.weight": part for t, part in zip(theirs, parts)})
    left = sorted(set(sd) - used)
    if left:
        raise ExportError(f"the model has weights with no Llama counterpart ({', '.join(left[:3])}); cannot export to hf")
    return out


def llama_config(run: LoadedRun, dtype: torch.dtype) -> dict:
    """config.json for LlamaConfig: `rope_parameters` for transformers 5, `rope_theta` for 4.x."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **llama_architecture(run.cfg.model),
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        MARKER: {"format": FORMAT, "step": int(run.state.get("step", 0)), "tokenizer": run.tokenizer.kind},
    }


def llama_architecture(mc) -> dict:
    """The LlamaConfig fields that make a Llama network the same as a transformer ModelConfig `mc`
    (also what benchmarks build `LlamaConfig(**...)` from)."""
    return {
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.d_model,
        "intermediate_size": mc.ff_dim,
        "num_hidden_layers": mc.n_layer,
        "num_attention_heads": mc.n_head,
        "num_key_value_heads": mc.kv_heads,
        "head_dim": mc.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": mc.context,
        "rms_norm_eps": mc.norm_eps,
        "rope_theta": mc.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": bool(mc.tie_weights),
    }


def tokenizer_config(context: int) -> dict:
    """tokenizer_config.json: the tokenizer.json as is; worldloom adds no BOS/EOS and no clean-up."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": None,
        "unk_token": None,
        "pad_token": None,
        "added_tokens_decoder": {},
    }
