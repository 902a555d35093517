"""LWM: token embeddings + a backbone from the registry + final norm + output head.

One network for every modality: which tokens mean text, observations or actions is the
stream layout's business; the model only sees ids in one joint vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone
from .backbones.moe import MoEFeedForward
from .backbones.transformer import RMSNorm, init_weights
from .config import ModelConfig
from .losses import LossOutput, next_token_loss


class LWM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.backbone = build_backbone(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer)  # also restores Mamba's own init of Δ, A and D
        if cfg.tie_weights:
            self.head.weight = self.embed.weight

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None):
        return self.backbone.new_cache(batch, max_len, pad)

    def forward(self, idx: torch.Tensor, cache=None):
        """idx (B, T) -> logits (B, T, V), cache."""
        h, cache = self.backbone(self.drop(self.embed(idx)), cache)
        return self.head(self.norm(h)), cache

    @property
    def supports_decode_step(self) -> bool:
        """Whether the backbone has a fixed-shape decode_step (for generate_ids(compile=True))."""
        return bool(getattr(self.backbone, "supports_decode_step", False))

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def decode_step(self, idx: torch.Tensor, cache, slot: torch.Tensor) -> torch.Tensor:
        """idx (B, 1) at cache slot `slot` -> next-token logits (B, V); fixed shapes (see backbone)."""
        h = self.backbone.decode_step(self.embed(idx), cache, slot)
        return self.head(self.norm(h))[:, -1]

    def compute_loss(self, batch: dict) -> LossOutput:
        """Next-token cross-entropy, plus every MoE layer's auxiliary (balance + z) loss.

        parts: ``loss`` (the cross-entropy) and, with MoE, ``moe_aux`` (the sum added to the
        total), ``moe_load_max`` / ``moe_load_min`` (per-expert share of tokens averaged over
        layers; k/E each when balanced) and ``moe_dropped`` (share dropped by capacity).
        """
        logits, _ = self(batch["input"])
        loss = next_token_loss(logits, batch["target"], batch.get("weight"))
        parts = {"loss": loss.detach().item()}
        moe = self.moe_layers()
        if not moe:
            return LossOutput(loss, parts)
        aux = torch.stack([m.aux_loss for m in moe]).sum()
        load = torch.stack([m.last_load for m in moe]).mean(0)  # (E,)
        parts.update(moe_aux=aux.detach().item(), moe_load_max=load.max().item(), moe_load_min=load.min().item(),
                     moe_dropped=sum(m.last_dropped for m in moe) / len(moe))
        return LossOutput(loss + aux, parts)
