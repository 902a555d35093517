"""`worldloom import hf PATH name=base`: a local transformers Llama folder -> a worldloom text run.

The inverse of ``export/hf.py``: the same layout (half-split rotary, SwiGLU, RMSNorm, no
biases), the same table of names (``LLAMA_LAYERS``), q/k/v and gate/up fused back in order.
Nothing is downloaded: the folder is the user's, and must hold

    config.json               a LlamaForCausalLM config (model_type llama)
    model.safetensors         its weights (or the shards model.safetensors.index.json names)
    tokenizer.json            a Hugging Face `tokenizers` file: the run's tokenizer, kind "hf"

Weights saved as pickles (``*.bin``, ``*.pt``, ``*.pth``) are refused, never loaded. The run folder
gets ``recipe: text``, ``tokenizer.kind: hf``, ``data.path: ""`` (give `eval` a ``--data FILE``,
`tune` a ``data.path=``), its weights as float32, and one checkpoint (step 0, no optimizer state).

Config map: hidden_size -> model.d_model, num_hidden_layers -> n_layer, num_attention_heads ->
n_head, num_key_value_heads -> n_kv_head, intermediate_size -> d_ff, rope_theta (or
rope_parameters.rope_theta), rms_norm_eps -> norm_eps, tie_word_embeddings -> tie_weights,
max_position_embeddings -> context, capped at ``CONTEXT_CAP`` (4096) because worldloom sizes its
buffers and training windows by it (``model.context=N`` on the command line picks another).
Refused, one line each: rope scaling (only plain rotary), attention or MLP biases, a head_dim
other than hidden_size / num_attention_heads, an activation other than silu. A tokenizer with
fewer tokens than the embedding has rows (a padded vocabulary) gets placeholder tokens
``<|pad_N|>`` up to it; one with more is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import AddedToken

from ..checkpoint import save_checkpoint
from ..config import ModelConfig, RunConfig, apply_overrides, from_dict, save_yaml, to_dict
from ..errors import WorldloomError
from ..io import atomic_folder, check_new_folder, load_tensors, read_json
from ..model import LWM
from ..run import CONFIG, TOKENIZER_DIR
from ..tokenize import TextTokenizer
from .hf import LLAMA_LAYERS

CONTEXT_CAP = 4096
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
                  "max_position_embeddings": 2048}  # LlamaConfig's, for the keys a config.json leaves out


class HFImportError(WorldloomError):
    """The folder is not a Llama model worldloom can represent, or its files are unusable."""


def import_hf(path: Path, overrides: list[str]) -> Path:
    """Import the Llama folder at ``path`` as a run folder (``name=``, ``out_dir=`` among ``overrides``); return it."""
    src = Path(path)
    if not src.is_dir():
        raise HFImportError(f"{src} is not a folder; give a local transformers Llama folder (config.json, *.safetensors, tokenizer.json)")
    hf = read_json(src / "config.json", "model config")
    cfg = run_config(model_config(hf), src.name, overrides)
    out = cfg.run_dir
    check_new_folder(out)
    tokenizer = _tokenizer(src / "tokenizer.json", cfg.model.vocab_size)
    model = LWM(cfg.model)
    try:
        model.load_state_dict(lwm_state_dict(read_weights(src), cfg.model))
    except RuntimeError as e:  # a tensor of another shape than config.json says
        raise HFImportError(f"the weights in {src} do not fit its config.json ({_first_mismatch(str(e))})") from None
    with atomic_folder(out) as tmp:
        save_yaml(to_dict(cfg), tmp / CONFIG)
        tokenizer.save(tmp / TOKENIZER_DIR)
        save_checkpoint(tmp, model, None, {"step": 0, "imported_from": str(src.resolve())})
    return out


def model_config(hf: dict) -> ModelConfig:
    """The transformer ModelConfig of a LlamaConfig dict; HFImportError for what worldloom cannot represent."""
    hf = {**LLAMA_DEFAULTS, **hf}
    try:
        _refuse_unrepresentable(hf)
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        return ModelConfig(
            backbone="transformer", ffn="swiglu", vocab_size=int(hf["vocab_size"]), d_model=d,
            n_layer=int(hf["num_hidden_layers"]), n_head=heads, n_kv_head=int(hf.get("num_key_value_heads") or heads),
            d_ff=int(hf["intermediate_size"]), context=min(int(hf["max_position_embeddings"]), CONTEXT_CAP),
            rope_theta=float(_rope_theta(hf)), norm_eps=float(hf["rms_norm_eps"]),
            tie_weights=bool(hf["tie_word_embeddings"]))
    except KeyError as e:
        raise HFImportError(f"config.json lacks {e.args[0]!r}; is this a LlamaForCausalLM folder?") from None
    except (TypeError, ValueError) as e:
        raise HFImportError(f"config.json holds a value worldloom cannot read ({str(e).splitlines()[0][:100]})") from None


def _refuse_unrepresentable(hf: dict) -> None:
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in (hf.get("architectures") or []):
        raise HFImportError(f"config.json describes a {hf.get('model_type') or 'unknown'} model; `import hf` takes LlamaForCausalLM folders")
    ropes = [r if isinstance(r, dict) else {"rope_type": r} for r in (hf.get("rope_scaling"), hf.get("rope_parameters")) if r]
    if any(r.get("rope_type", r.get("type", "default")) != "default" for r in ropes):
        raise HFImportError("the model uses rope scaling; worldloom has only plain rotary positions (rope_type default)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFImportError("the model has attention or MLP biases; worldloom's transformer has none")
    if hf["hidden_act"] not in ("silu", "swish"):
        raise HFImportError(f"the model's activation is {hf['hidden_act']}; worldloom's SwiGLU uses silu")
    head_dim, d, heads = hf.get("head_dim"), hf.get("hidden_size"), hf.get("num_attention_heads")
    if head_dim and d and heads and head_dim * heads != d:
        raise HFImportError(f"head_dim {head_dim} is not hidden_size / num_attention_heads ({d} / {heads}); "
                            "worldloom's heads split the model width")


def _rope_theta(hf: dict) -> float:
    """rope_theta of transformers 4 (top level) or 5 (rope_parameters)."""
    return (hf.get("rope_parameters") or {}).get("rope_theta", hf["rope_theta"])


def run_config(mc: ModelConfig, name: str, overrides: list[str]) -> RunConfig:
    """A text run with the model `mc` and the imported tokenizer; overrides may set anything but the model
    (except model.context) and the tokenizer."""
    blocked = [o for o in overrides if re.match(r"(model|tokenizer|recipe)\b", o) and not o.startswith("model.context=")]
    if blocked:
        raise HFImportError(f"{blocked[0].split('=')[0]} is the imported model's; only model.context may change "
                            "(e.g. name=base out_dir=runs model.context=2048)")
    data = {"name": name, "recipe": "text", "data": {"path": ""}, "model": to_dict(mc),
            "tokenizer": {"kind": "hf", "vocab_size": mc.vocab_size}}
    apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors weights (one file, or the shards an index names)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, "weights index").get("weight_map", {}).values()))
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or not s.endswith(".safetensors")]
        if bad or not shards:
            raise HFImportError(f"{index} names no shards, or shards outside its folder ({bad[:1]})")
    elif (src / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLES)
        if pickles:
            raise HFImportError(f"{src} holds its weights as {pickles[0]}, a pickle, which worldloom never loads (loading one "
                                "can run code); save them as safetensors: model.save_pretrained(dir, safe_serialization=True)")
        raise HFImportError(f"{src} holds no model.safetensors (nor model.safetensors.index.json)")
    tensors = {}
    for shard in shards:
        tensors.update(load_tensors(src / shard, "weights file"))
    return tensors


def lwm_state_dict(w: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM tensors -> the LWM's names (q/k/v, gate/up fused in order), float32."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in w:
            raise HFImportError(f"the weights lack {name}; not a LlamaForCausalLM of this config.json")
        used.add(name)
        return w[name].float()

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if mc.tie_weights:
        out["head.weight"] = out["embed.weight"]
        used.add("lm_head.weight")  # a tied model may save its head too: the embedding is it
    else:
        out["head.weight"] = take("lm_head.weight")
    for i in range(mc.n_layer):
        for ours, theirs in LLAMA_LAYERS.items():
            out[f"backbone.blocks.{i}.{ours}.weight"] = torch.cat([take(f"model.layers.{i}.{t}.weight") for t in theirs])
    extra = sorted(k for k in w if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise HFImportError(f"the weights hold tensors a plain Llama has not ({', '.join(extra[:2])}); "
                            "worldloom cannot represent them")
    return out


def _tokenizer(path: Path, vocab: int) -> TextTokenizer:
    """The folder's tokenizer.json, padded with placeholder tokens up to the embedding's rows."""
    tok = TextTokenizer.from_file(path, "hf")
    if tok.vocab_size > vocab:
        raise HFImportError(f"{path} has {tok.vocab_size} tokens but the model embeds only vocab_size={vocab}")
    if tok.vocab_size < vocab:
        tok.tok.add_special_tokens([AddedToken(f"<|pad_{i}|>", special=True) for i in range(tok.vocab_size, vocab)])
    if tok.vocab_size != vocab:  # pragma: no cover - ids with gaps in the tokenizer file
        raise HFImportError(f"{path} cannot be padded to the model's {vocab} tokens (its ids have gaps)")
    return tok


def _first_mismatch(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else "RuntimeError")[:200]
