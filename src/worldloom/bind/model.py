"""One encoder per modality into one shared, unit-length embedding space (ImageBind-style).

    view     grid tokens (N, 50) --embed--> FrameEncoder (3x3 convolutions over the 7x7 cells, the
             direction joined after) --> (N, dim)
    text     word ids (N, text_len) -------+
    actions  action ids (N, action_len) ---+--> SequenceEncoder: embedding + a bidirectional layer stack
                                               of the model's backbone (model.n_layer, d_model, n_head),
                                               mean over the real tokens --> (N, dim)

A training row holds one item's three segments side by side (``BindModel.split``):
``[view tokens (obs_len) | text ids (text_len) | action ids (action_len)]``, right-padded with each
segment's pad id. ``forward`` returns every modality's embeddings, L2-normalised, and the logit
scale exp(s) = 1 / temperature, a learned scalar (initialised from ``bind.temperature``, capped at
100 as in CLIP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import build_backbone
from ..backbones.transformer import RMSNorm
from ..modality import FrameEncoder

MODALITIES = ("view", "text", "actions")
N_ACTIONS = 7  # MiniGrid's actions; id 7 pads an action segment
MAX_SCALE = math.log(100.0)


@dataclass
class BindOutput:
    embeddings: dict  # modality -> (N, dim), unit length
    scale: torch.Tensor  # () the logit scale 1 / temperature


class SequenceEncoder(nn.Module):
    """Ids (N, T) right-padded with ``pad`` -> (N, dim): a bidirectional pass (pads are attended as one more
    constant token), the mean of the real tokens' states."""

    def __init__(self, vocab: int, pad: int, model_cfg, context: int, dim: int):
        super().__init__()
        self.pad = pad
        cfg = replace(model_cfg, vocab_size=vocab, context=context, backbone="transformer", layers="", dropout=0.0)
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.backbone = build_backbone(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.backbone(self.embed(ids), causal=False)  # (N, T, d_model)
        real = (ids != self.pad).unsqueeze(-1).to(h.dtype)  # (N, T, 1)
        pooled = (self.norm(h) * real).sum(1) / real.sum(1).clamp(min=1.0)
        return self.proj(pooled)


class ViewEncoder(nn.Module):
    """Grid tokens (N, obs_len) -> (N, dim) through the world model's frame encoder."""

    def __init__(self, vocab: int, obs_len: int, grid: int, d_model: int, channels: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.frame = FrameEncoder(d_model, obs_len, grid, vectors=1, channels=channels)
        self.proj = nn.Linear(d_model, dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.frame(self.embed(ids))[:, 0]))  # (N, 1, d_model) -> (N, dim)


class BindModel(nn.Module):
    def __init__(self, cfg):
        """``cfg``: a RunConfig of recipe bind; ``cfg.model.vocab_size`` is the text tokenizer's (set from the data)."""
        super().__init__()
        from ..tokenize import GridTokenizer

        b, m = cfg.bind, cfg.model
        grid = GridTokenizer(b.view)
        self.lengths = (grid.n_tokens, b.text_len, b.action_len)
        self.text_pad = m.vocab_size  # one id past the tokenizer's
        self.encoders = nn.ModuleDict({
            "view": ViewEncoder(grid.vocab_size, grid.n_tokens, b.view, m.d_model, b.channels, b.dim),
            "text": SequenceEncoder(m.vocab_size + 1, self.text_pad, m, b.text_len, b.dim),
            "actions": SequenceEncoder(N_ACTIONS + 1, N_ACTIONS, m, b.action_len, b.dim),
        })
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / b.temperature)))  # a scalar: no weight decay

    @property
    def scale(self) -> torch.Tensor:
        """The logit scale exp(s) = 1 / temperature, capped at 100."""
        return self.log_scale.clamp(max=MAX_SCALE).exp()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def split(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """A row of ids (N, obs_len + text_len + action_len) -> its three segments."""
        return dict(zip(MODALITIES, torch.split(idx, self.lengths, dim=1)))

    def embed(self, modality: str, ids: torch.Tensor) -> torch.Tensor:
        """(N, length of the modality's segment) -> (N, dim), unit length."""
        return F.normalize(self.encoders[modality](ids).float(), dim=-1)

    def forward(self, idx: torch.Tensor, modalities: tuple[str, ...] = MODALITIES) -> BindOutput:
        parts = self.split(idx)
        return BindOutput({k: self.embed(k, parts[k]) for k in modalities}, self.scale)
