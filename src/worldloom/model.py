"""LWM: token embeddings + a backbone from the registry + final norm + output head.

One network for every modality: which tokens mean text, observations or actions is the
stream layout's business; the model only sees ids in one joint vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone
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
        init_weights(self, cfg.n_layer)
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

    def compute_loss(self, batch: dict) -> LossOutput:
        logits, _ = self(batch["input"])
        loss = next_token_loss(logits, batch["target"], batch.get("weight"))
        return LossOutput(loss, {"loss": loss.detach().item()})
