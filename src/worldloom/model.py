"""LWM: token embeddings + a backbone from the registry + final norm + output head.

One network for every modality: which tokens mean text, observations or actions is the
stream layout's business; the model only sees ids in one joint vocabulary. Two optional
parts serve world-model streams:

* slot embeddings (``model.slots``): a learned vector per position within a world step
  (which cell of the view, the action, the reward...), added to the token embedding;
* a step-skip input (``model.period``, the step length): position i also embeds the token
  at i + 1 - period, the value its target had one world step earlier (the same cell of the
  previous view, the previous direction, the previous action), through a learned projection;
  it is causal (that token is already in the past) and gives the model a direct path to the
  previous step instead of having to learn to find it by attention;
* 2-D cell positions (``model.slot_grid``): when a step starts with the cells of a square
  grid read row by row, each such position also embeds its row and its column (a factorised
  2-D position, as ViT-style models do for patches), so that "the cell one row nearer" or
  "the same column" is the same relation everywhere in the view;
* a frame head (``model.frame_tokens``): from the hidden state at one position, all tokens
  of the next observation at once (parallel observation prediction, as REM and M3 do):
  ``logits[k] = head(norm(h + mlp(h + query_k)))`` for k < frame_tokens, through the same
  output head as next-token prediction;
* encoded observations (``model.obs_vectors``, ``stream.obs=encoded``): a frame encoder hands the
  backbone a few vectors per observation instead of its tokens, and a frame decoder predicts the
  next observation's tokens from the step's state and the previous frame (worldloom.modality);
* a vision prefix (``vision_prefix``, attached by the talk recipe's ``talk.view=prefix``,
  worldloom.talk.prefix): images encoded and projected into the embedding space, their vectors
  put in place of the token embeddings at the positions ``prefix_at`` marks (LLaVA-style).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone
from .backbones.moe import MoEFeedForward
from .backbones.transformer import RMSNorm, init_weights
from .config import ModelConfig
from .modality import BOS, N_SPECIAL, FrameDecoder, FrameEncoder, FramePlan, mission_vectors, mission_words, policy_slot

MODEL_INPUTS = ("slots", "skip", "frame_index", "causal", "prefix_views", "prefix_at")  # batch keys that are model inputs besides "input"


@dataclass
class ModelOutput:
    """What ``LWM.forward`` returns: everything an objective or a decoder needs."""

    logits: torch.Tensor | None  # (B, T, V) next-token logits; None when called with head=False
    hidden: torch.Tensor  # (B, T, C) the backbone's last hidden states (before the final norm)
    cache: object = None  # the decoding cache, when one was passed
    frame_logits: torch.Tensor | None = None  # (N, frame_tokens, V) at ``frame_index`` (models with a frame head)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # MoE: moe_aux (loss), moe_load (E,), moe_dropped
    values: torch.Tensor | None = None  # (B, T) the value head's scalar at every position (models with model.value_head)


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of ``LWM.forward`` found in a training batch."""
    return {"idx": batch["input"], **{k: batch[k] for k in MODEL_INPUTS if k in batch}}


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
        self.slot_embed = nn.Embedding(cfg.slots, cfg.d_model) if cfg.slots else None
        self.mission_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.mission_vec else None
        self.skip_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.period else None
        self.attr_embed = self.match_embed = None
        # the attributes each id shows (a cell: object, colour) or names (a word), 0 = none; filled by the world task
        self.register_buffer("id_attrs", torch.zeros(cfg.vocab_size, 2, dtype=torch.long) if cfg.name_attrs else None)
        if cfg.name_attrs:
            if cfg.name_vectors:  # stream.names: ids that show or name an attribute add its vector
                self.attr_embed = nn.Embedding(cfg.name_attrs + 1, cfg.d_model, padding_idx=0)
            if cfg.mission_match:  # stream.match: a cell adds 1 + [mission names its object] + 2 [... its colour]
                self.match_embed = nn.Embedding(5, cfg.d_model, padding_idx=0)
        reads_mission = bool(cfg.mission_vec or cfg.obs_film)
        self.mission_gru = (nn.GRU(cfg.d_model, cfg.d_model, batch_first=True)
                            if reads_mission and cfg.mission_encoder == "gru" else None)
        self.grid_embed = None
        if cfg.slot_grid:  # row and column (1..g; 0 = not a grid cell) of every slot, one table for both
            g = cfg.slot_grid
            cells = torch.arange(cfg.slots) - 1
            is_cell = (cells >= 0) & (cells < g * g)
            self.register_buffer("slot_row", torch.where(is_cell, cells // g + 1, 0), persistent=False)
            self.register_buffer("slot_col", torch.where(is_cell, cells % g + 1 + g, 0), persistent=False)
            self.grid_embed = nn.Embedding(2 * g + 1, cfg.d_model, padding_idx=0)
        self.frame = FrameHead(cfg.d_model, cfg.frame_tokens, cfg.ff_dim) if cfg.frame_tokens else None
        self.value = nn.Linear(cfg.d_model, 1) if cfg.value_head else None  # reward models: a scalar per position
        self.obs_encoder = self.obs_decoder = None
        if cfg.obs_vectors:
            self.obs_encoder = FrameEncoder(cfg.d_model, cfg.obs_len, cfg.obs_grid, cfg.obs_vectors, film=cfg.obs_film)
            self.obs_decoder = FrameDecoder(cfg.d_model, cfg.obs_len, cfg.obs_decoder_layers, cfg.n_head, cfg.ff_dim)
            self.register_buffer("obs_cell", torch.arange(cfg.obs_len), persistent=False)
        init_weights(self, cfg.n_layer)  # also restores Mamba's own init of Δ, A and D
        if self.grid_embed is not None:
            with torch.no_grad():
                self.grid_embed.weight[0].zero_()  # "not a grid cell" adds nothing (padding_idx: never trained)
        for table in (self.attr_embed, self.match_embed):
            if table is not None:
                with torch.no_grad():
                    table.weight[0].zero_()
        if cfg.tie_weights:
            self.head.weight = self.embed.weight
        self._moe = [m for m in self.modules() if isinstance(m, MoEFeedForward)]  # a plain list: not registered twice
        self.vision_prefix = None  # images (N, H, W, 3) -> (N, K, d_model); attached by worldloom.talk.prefix

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None):
        return self.backbone.new_cache(batch, max_len, pad)

    def forward(self, idx: torch.Tensor, cache=None, slots: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                frame_index: torch.Tensor | None = None, head: bool = True, causal: bool | torch.Tensor = True,
                tree=None, prefix_views: torch.Tensor | None = None, prefix_at: torch.Tensor | None = None,
                mission: torch.Tensor | None = None) -> ModelOutput:
        """idx (B, T) [, slots (B, T), skip (B, T)] -> ModelOutput. The one entry point: training,
        evaluation and decoding all call the model, so ``torch.compile`` and DDP/FSDP wrap what runs.

        ``skip`` holds, for a model with a step-skip input, the id one period before each
        position's target (0 = none). ``frame_index`` (N,) names flattened (b * T + t) positions
        whose hidden state predicts the whole next observation through the frame head.
        ``head=False`` skips the output head (callers that only need a few positions' logits).
        ``causal=False`` makes a bidirectional pass (masked objectives, `worldloom fill`; attention-only
        models); a (B,) bool tensor chooses per row (True: causal). ``tree = (see, pos)``: the new tokens
        are a tree of candidates verified in one pass (Medusa; `backbones.stack.Stack.forward`).
        ``prefix_views`` (N, H, W, 3) images and ``prefix_at`` (B, T) bool with N * K True positions: a model with a
        ``vision_prefix`` embeds the images as K vectors each and puts them there, in order (a vision prefix).
        ``mission`` (B, P): each row's mission prefix ids (left padded), for a model that reads the mission
        vector (``model.obs_film``, ``model.mission_vec``) when the rows fed hold no prefix (cached decoding);
        rows that do (training, prefill) need none."""
        if self.obs_encoder is not None:
            if tree is not None:
                raise ValueError("a tree of candidates is for token streams; this model encodes observations")
            return self._forward_encoded(idx, cache, slots, head, causal, mission)
        x, _ = self._embed(idx, slots, skip, mission)
        if prefix_at is not None and prefix_views is not None and len(prefix_views):
            x = self._put_prefix(x, prefix_views, prefix_at)
        h, cache = self.backbone(self.drop(x), cache, causal=causal, tree=tree)
        logits = self.logits_of(h) if head else None
        frame = None
        if frame_index is not None and self.frame is not None and frame_index.numel():
            frame = self.frame_logits(h.flatten(0, 1)[frame_index])  # (N, F, V)
        return ModelOutput(logits, h, cache, frame, self._moe_aux(), self._values(h))

    def _put_prefix(self, x: torch.Tensor, views: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) with the vision prefix's vectors of ``views`` (N images -> N * K vectors) at ``at`` (B, T), in order."""
        if self.vision_prefix is None:
            raise ValueError("this model has no vision prefix (a talk run with talk.view=prefix has one)")
        vectors = self.vision_prefix(views).to(x.dtype)  # (N, K, C)
        if int(at.sum()) != vectors.shape[0] * vectors.shape[1]:
            raise ValueError(f"prefix_at marks {int(at.sum())} positions for {vectors.shape[0]} images of {vectors.shape[1]} vectors")
        return x.masked_scatter(at.unsqueeze(-1), vectors.reshape(-1, x.shape[-1]))

    def _values(self, h: torch.Tensor) -> torch.Tensor | None:
        return self.value(self.norm(h)).squeeze(-1).float() if self.value is not None else None

    def _forward_encoded(self, idx, cache, slots, head, causal, mission=None) -> ModelOutput:
        """Encoded observations (worldloom.modality): compress, run the backbone, expand back to the ids,
        and put the frame decoder's logits where the stream predicts observation tokens."""
        if slots is None:
            raise ValueError("this model encodes observations (a world-model stream); pass slots=")
        cfg = self.cfg
        B, T = idx.shape
        plan = FramePlan.build(slots, cfg.obs_len, cfg.slots - 1, cfg.obs_vectors, idx)
        tokens, m = self._embed(idx, slots, None, mission)
        vectors = self.obs_encoder(self.token_embed(plan.frames(idx, plan.frame_src, cfg.obs_len)),
                                   m.flatten(0, 1)[plan.frame_src] if cfg.obs_film else None)  # (N, K, C)
        vectors = vectors + self.slot_embed.weight[1 : 1 + cfg.obs_vectors]
        hc, cache = self.backbone(self.drop(plan.compress(tokens, vectors, B)), cache, causal=causal)
        h = plan.expand(hc)  # (B, T, C)
        logits = plan.expand(self.logits_of(hc)) if head else None  # the head once per backbone position
        if logits is not None and len(plan.decode_at):
            frame = self.frame_logits(h.flatten(0, 1)[plan.decode_at], plan.frames(idx, plan.decode_prev, cfg.obs_len))
            at = plan.decode_at.unsqueeze(1) + self.obs_cell  # (D, obs_len) flat positions the frame's cells fill
            ok = at < (plan.decode_at // T + 1).unsqueeze(1) * T  # still in the same row
            V = logits.shape[-1]
            logits = logits.reshape(-1, V).index_copy(0, at[ok], frame[ok].to(logits.dtype)).view(B, T, V)
        return ModelOutput(logits, h, cache, None, self._moe_aux(), self._values(h))

    def _mission_of(self, x, idx, slots, mission) -> torch.Tensor:
        """The mission vector (mean word embedding) of the episode each position of idx (B, T) is in: (B, T, C);
        ``x`` = the token embeddings of idx, looked up already."""
        B, T = idx.shape
        if self.mission_gru is not None:  # the words in order, through a GRU: its last state
            if mission is None:
                words, lengths, which = mission_words(idx, slots, torch.arange(B * T, device=idx.device), BOS, N_SPECIAL)
            else:  # each row's prefix (left padded): its words, moved to the front in order
                is_word = mission >= N_SPECIAL
                order = torch.sort((~is_word).to(torch.int8), dim=1, stable=True).indices
                lengths = is_word.sum(1)
                words = mission.gather(1, order)[:, : max(int(lengths.max()), 1)] * (lengths > 0).unsqueeze(1)
                which = torch.where(lengths > 0, torch.arange(B, device=idx.device), -1).repeat_interleave(T)
            if not len(words):
                return x.new_zeros(B, T, x.shape[-1])
            out, _ = self.mission_gru(self.token_embed(words).to(x.dtype))
            last = out[torch.arange(len(words), device=idx.device), (lengths - 1).clamp(min=0)]  # (S, C)
            return torch.where((which >= 0).unsqueeze(1), last[which.clamp(min=0)], 0.0).view(B, T, -1)
        if mission is None:
            return mission_vectors(x, idx, slots, torch.arange(B * T, device=idx.device), BOS, N_SPECIAL).view(B, T, -1)
        words = (mission >= N_SPECIAL).unsqueeze(-1)
        e = self.token_embed(mission) * words
        return (e.sum(1) / words.sum(1).clamp(min=1)).unsqueeze(1).expand(B, T, -1)

    def _embed(self, idx: torch.Tensor, slots: torch.Tensor | None, skip: torch.Tensor | None,
               mission: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings (B, T, C), plus slot, 2-D cell position, step-skip and mission inputs where the model has
        them; and the mission vector of every position (B, T, C) for a model that reads it (else None)."""
        if mission is not None and mission.shape[0] != idx.shape[0]:
            raise ValueError(f"mission= has {mission.shape[0]} rows for {idx.shape[0]} rows of ids")
        x = self.token_embed(idx)
        m = None
        if self.match_embed is not None and slots is not None:
            x = x + self.match_embed(self._mission_match(idx, slots, mission))
        if slots is not None and (self.mission_proj is not None or self.cfg.obs_film):
            m = self._mission_of(x, idx, slots, mission)
        if self.mission_proj is not None and slots is not None:  # step positions hear the mission (model.mission_vec)
            # "policy": only the step's last observation position, which predicts the action
            where = slots > 0 if self.cfg.mission_vec == "all" else slots == policy_slot(self.cfg.slots)
            x = x + self.mission_proj(m.to(x.dtype)) * where.unsqueeze(-1)
        if self.slot_embed is not None:
            if slots is None:
                raise ValueError("this model embeds slots (a world-model stream); pass slots=")
            x = x + self.slot_embed(slots)
            if self.grid_embed is not None:
                x = x + self.grid_embed(self.slot_row[slots]) + self.grid_embed(self.slot_col[slots])
        if self.skip_proj is not None:
            if skip is None:
                raise ValueError("this model has a step-skip input (a world-model stream); pass skip=")
            x = x + self.skip_proj(self.token_embed(skip) * (skip != 0).unsqueeze(-1))
        return x, m

    @property
    def reads_mission(self) -> bool:
        """Whether positions read their episode's mission directly (FiLM, mission vector, mission match): cached
        decoding then passes the rows' mission prefixes as ``forward(mission=)``."""
        cfg = self.cfg
        return bool(cfg.obs_film or cfg.mission_vec or self.match_embed is not None)

    def _mission_match(self, idx: torch.Tensor, slots: torch.Tensor, mission: torch.Tensor | None) -> torch.Tensor:
        """(B, T) index into ``match_embed``: at an observation cell (an id showing an object and a colour),
        1 + [its object is named by its episode's mission] + 2 [its colour is]; 0 elsewhere."""
        B, T = idx.shape
        A = self.cfg.name_attrs + 1
        attrs = self.id_attrs[idx]  # (B, T, 2)
        if mission is None:  # the words of each position's episode, found from its <bos> in the row
            named = F.one_hot(attrs[..., 0], A).to(torch.float32)
            present = mission_vectors(named, idx, slots, torch.arange(B * T, device=idx.device), BOS, N_SPECIAL).view(B, T, A)
        else:
            words = (mission >= N_SPECIAL).unsqueeze(-1)
            named = F.one_hot(self.id_attrs[mission][..., 0], A) * words
            present = named.sum(1, keepdim=True).expand(B, T, A)
        present = (present > 0).long()
        present[..., 0] = 0
        obj, col = attrs[..., 0], attrs[..., 1]
        hit = present.gather(-1, obj.unsqueeze(-1)).squeeze(-1) + 2 * present.gather(-1, col.unsqueeze(-1)).squeeze(-1)
        return torch.where(col > 0, 1 + hit, 0)

    def token_embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The embeddings of ids: the token table, plus the vectors of the attributes an id shows or names
        (model.name_attrs, stream.names)."""
        x = self.embed(idx)
        if self.attr_embed is not None:
            x = x + self.attr_embed(self.id_attrs[idx]).sum(-2)
        return x

    def _moe_aux(self) -> dict[str, torch.Tensor]:
        """The MoE layers' auxiliary loss (summed) and load (averaged) of the forward that just ran."""
        moe = self.moe_layers()
        if not moe:
            return {}
        return {"moe_aux": torch.stack([m.aux_loss for m in moe]).sum(),
                "moe_load": torch.stack([m.last_load for m in moe]).mean(0),
                "moe_dropped": torch.tensor(sum(m.last_dropped for m in moe) / len(moe))}

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) from hidden states (..., C) (final norm, then the head)."""
        return self.head(self.norm(h))

    def frame_logits(self, h: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (N, C) -> logits (N, frame_tokens, V) of the next observation's tokens. A model
        with encoded observations decodes from the state and ``prev`` (N, obs_len), the previous frame's ids."""
        if self.obs_decoder is not None:
            if prev is None:
                raise ValueError("this model's frame decoder reads the previous frame: pass prev=")
            cells = self.token_embed(prev)
            if self.grid_embed is not None:
                slots = self.obs_cell + 1
                cells = cells + self.grid_embed(self.slot_row[slots]) + self.grid_embed(self.slot_col[slots])
            return self.logits_of(self.obs_decoder(h, cells))
        if self.frame is None:
            raise ValueError("this model has no frame head (train with stream.parallel_obs=true)")
        return self.logits_of(self.frame(h))

    @property
    def supports_decode_step(self) -> bool:
        """Whether the backbone has a fixed-shape decode_step (for generate_ids(compile=True))."""
        return bool(getattr(self.backbone, "supports_decode_step", False))

    def moe_layers(self) -> list[MoEFeedForward]:
        return self._moe

    def decode_step(self, idx: torch.Tensor, cache, slot: torch.Tensor) -> torch.Tensor:
        """idx (B, 1) at cache slot `slot` -> next-token logits (B, V); fixed shapes (see backbone)."""
        h = self.backbone.decode_step(self.embed(idx), cache, slot)
        return self.logits_of(h)[:, -1]


class FrameHead(nn.Module):
    """h (..., C) -> (..., n, C): one query per token of the next observation, each refined by a SwiGLU MLP."""

    def __init__(self, d_model: int, n: int, hidden: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n, d_model) * 0.02)
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.unsqueeze(-2) + self.query  # (..., n, C)
        g, u = self.up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)
