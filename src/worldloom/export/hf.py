"""`worldloom export hf`: a run folder -> a `transformers.LlamaForCausalLM` folder.

The transformer backbone already uses the Llama layout (half-split rotary, q/k/v heads in
order, SwiGLU, RMSNorm, no biases), so the export renames tensors and splits the fused
``qkv`` and ``gate_up`` projections; no value is changed. The folder holds::

    config.json              LlamaConfig, written by hand (transformers is not needed here)
    model.safetensors        weights under Hugging Face names
    tokenizer.json           the run's tokenizer, unchanged
    tokenizer_config.json    PreTrainedTokenizerFast, no special tokens, no space clean-up

Every file is written atomically. ``config.json`` carries a ``worldloom_export`` key, which
is how a later export recognises a folder it may overwrite.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WorldloomError
from ..io import atomic_write_text, read_json, save_tensors, write_json
from ..run import LoadedRun

FORMAT = "worldloom-hf-export/1"
MARKER = "worldloom_export"


class ExportError(WorldloomError):
    """The run cannot be exported, or the output folder cannot be written."""


def export_hf(run: LoadedRun, out: Path) -> Path:
    """Write `run` as a Hugging Face Llama folder at `out`; return `out`."""
    out = Path(out)
    mc = run.cfg.model
    if mc.backbone != "transformer":
        raise ExportError(f"only the 'transformer' backbone can be exported to hf, this run uses '{mc.backbone}'")
    if mc.ffn != "swiglu":
        raise ExportError(f"only the SwiGLU feed-forward can be exported to hf (Llama), this run uses model.ffn={mc.ffn}")
    _check_out(out)
    tensors = hf_state_dict(run.model)
    dtype = next(iter(tensors.values())).dtype
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_text(out / "tokenizer.json", run.tokenizer.tok.to_str())
        write_json(out / "tokenizer_config.json", tokenizer_config(mc.context))
        write_json(out / "config.json", llama_config(run, dtype))  # last: marks a complete export
    except OSError as e:
        raise ExportError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return out


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


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """worldloom LWM weights under `LlamaForCausalLM` names (lm_head left out when tied)."""
    cfg = model.cfg
    H, KV, D, F = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
    sd = model.state_dict()
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return sd[name].detach().cpu()

    out = {"model.embed_tokens.weight": take("embed.weight"), "model.norm.weight": take("norm.weight")}
    tied = cfg.tie_weights
    head = take("head.weight")
    if not tied:
        out["lm_head.weight"] = head
    for i in range(cfg.n_layer):
        src, dst = f"backbone.blocks.{i}.", f"model.layers.{i}."
        q, k, v = take(src + "attn.qkv.weight").split([H * D, KV * D, KV * D], dim=0)
        gate, up = take(src + "mlp.gate_up.weight").split([F, F], dim=0)
        out.update({
            dst + "input_layernorm.weight": take(src + "attn_norm.weight"),
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": take(src + "attn.proj.weight"),
            dst + "post_attention_layernorm.weight": take(src + "mlp_norm.weight"),
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": take(src + "mlp.down.weight"),
        })
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
