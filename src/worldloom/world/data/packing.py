"""Training batches of tokenized episodes for the world model + policy.

A training row packs whole episodes one after the other up to the context (the last one cut
where the row ends), each behind its own mission prefix ``<bos> mission <sep>``, so no
position is wasted on padding; an episode longer than the context contributes a window of
whole steps from a random start. ``windows`` gives one episode per row, padded on the right
with weight 0. Each target position is weighted by its kind (``stream.weight_*``). The policy
target at an action position is the episode's policy label (``Episode.policy_label``): the
expert's action, which in on-policy episodes may differ from the action taken (the input keeps
the action taken, so the world model still learns its consequences); actions the collector
injected at random have no label and are not policy targets (weight 0).
"""

from __future__ import annotations

import numpy as np
import torch

from ...config import StreamConfig
from ...errors import DataError
from ..stream import K_ACTION, K_DONE, K_MISSION, K_OBS, K_PAD, K_REWARD, KINDS, PAD, EpisodeTokens, StreamLayout

PARTS = {"obs": K_OBS, "action": K_ACTION, "reward": K_REWARD, "done": K_DONE}  # logged as loss_<name>


class EpisodeData:
    def __init__(self, layout: StreamLayout, train: list[EpisodeTokens], val: list[EpisodeTokens], cfg: StreamConfig,
                 frame_head: bool = False, step_skip: bool = False, step_cost: int | None = None):
        if not train:
            raise DataError("the episode dataset holds no training episodes")
        if not val:
            raise DataError("the episode dataset holds no validation episodes")
        self.layout, self.cfg, self.frame_head, self.step_skip = layout, cfg, frame_head, step_skip
        # model positions one step takes (its ids, or fewer for a model that encodes observations): the
        # context is counted in these; rows are then cut at whole steps rather than at an exact length
        self.step_cost = layout.step_len if step_cost is None else int(step_cost)
        self.splits = {"train": train, "val": val}
        w = np.zeros(len(KINDS), dtype=np.float32)
        w[K_MISSION], w[K_OBS], w[K_ACTION] = cfg.weight_mission, cfg.weight_obs, cfg.weight_action
        w[K_REWARD], w[K_DONE] = cfg.weight_reward, cfg.weight_done
        self.kind_weight = w
        self._skips: dict = {}  # id(episode) -> its steps' step-skip ids, with a place rule (the episodes stay alive in splits)

    def tokens(self, split: str) -> int:
        return sum(len(e.prefix) + e.steps.size for e in self.splits[split])

    def check_context(self, context: int) -> None:
        longest = max(len(e.prefix) for e in self.splits["train"])
        if context + 1 < longest + self.step_cost:
            raise DataError(f"model.context={context} cannot hold the mission ({longest} tokens) and one step "
                            f"({self.layout.step_len} tokens); raise model.context")

    # -- rows
    def row(self, ep: EpisodeTokens, context: int, start: int | None = None, gen: torch.Generator | None = None):
        """The token sequence (at most context+1 long) of one episode, from step `start` (random if None)."""
        m = (context + 1 - len(ep.prefix)) // self.step_cost  # whole steps that fit
        if ep.length > m:
            if start is None:
                start = int(torch.randint(ep.length - m + 1, (1,), generator=gen))
        else:
            start = 0
        steps = ep.steps[start : start + m]
        seq = np.concatenate([ep.prefix, steps.reshape(-1)])
        policy = ep.policy[start : start + m]
        if self.layout.place_rule is None:
            return seq, len(ep.prefix), policy
        S, P = self.layout.step_len, len(ep.prefix)
        skip = np.zeros(len(seq), np.int64)
        skip[P:] = self._episode_skip(ep)[start * S : start * S + len(seq) - P]
        return seq, P, policy, skip

    def _episode_skip(self, ep: EpisodeTokens) -> np.ndarray:
        """The step-skip ids of a whole episode's steps (positions from its first step), once per episode: a place
        rule's memory is a loop over frames, ~10x the rest of a batch, and windows read it from the episode start."""
        got = self._skips.get(id(ep))
        if got is None:
            got = self._skips[id(ep)] = self.layout.step_skip(ep.steps.reshape(1, -1))[0]
        return got

    def segment(self, seq: np.ndarray, P: int, policy: np.ndarray, skip: np.ndarray | None = None):
        """One episode's tokens -> ids, slots, kinds, weights and target ids of each position (as a
        target): the target ids are the ids, except at action positions, which hold the policy label.
        ``skip``: its step-skip ids when `row` has them (a place rule reads the episode before the window)."""
        lay = self.layout
        slots = np.zeros(len(seq), np.int64)
        kinds = np.full(len(seq), K_MISSION, np.int64)
        slots[P:] = lay.slots_at(0, len(seq) - P)
        kinds[P:] = lay.kinds_at(0, len(seq) - P)
        kinds[0] = K_PAD  # <bos> is never a target: nothing before it predicts it
        weight = self.kind_weight[kinds]
        weight[P : P + lay.obs_len] *= self.cfg.weight_first_obs / self.cfg.weight_obs if self.cfg.weight_obs else 0.0
        act = np.flatnonzero(kinds == K_ACTION)
        label = policy[: len(act)]
        weight[act] *= (label >= 0).astype(np.float32)  # steps without a label are not policy targets
        target = seq.copy()
        target[act] = np.where(label >= 0, label, seq[act])
        return seq, slots, kinds, weight, lay.skip_ids(seq, P) if skip is None else skip, target

    def collate(self, rows: list[list[tuple[np.ndarray, int, np.ndarray]]], length: int | None = None) -> dict:
        """Rows of one or more episode segments (each from `row`) -> a padded batch.

        A row's segments are concatenated and cut at ``length`` tokens (the context + 1);
        targets are the next tokens, each weighted by the kind of the target.
        """
        lay = self.layout
        built = []
        for segments in rows:
            parts = [self.segment(*seg) for seg in segments]
            ids, slots, kinds, weight, skip, target = (np.concatenate([p[i] for p in parts]) for i in range(6))
            frames = []
            if self.frame_head:  # each done token followed by a whole observation predicts that observation
                off = 0
                for seq, P, *_ in segments:
                    n_steps = (len(seq) - P) // lay.step_len
                    frames += [off + P + t * lay.step_len + lay.step_len - 1 for t in range(n_steps - 1)]
                    off += len(seq)
            if length is not None:
                ids, slots, kinds, weight, skip, target = (a[:length] for a in (ids, slots, kinds, weight, skip, target))
            frames = [p for p in frames if p + lay.obs_len < len(ids)]
            built.append((ids, slots, kinds, weight, skip, target, frames))
        T = max(len(b[0]) for b in built) - 1
        B = len(built)
        inp = np.full((B, T), PAD, np.int64)
        tgt = np.full((B, T), PAD, np.int64)
        slots = np.zeros((B, T), np.int64)
        kind = np.zeros((B, T), np.int64)
        weight = np.zeros((B, T), np.float32)
        skip = np.zeros((B, T), np.int64)
        frame_index, frame_target = [], []
        for b, (ids, sl, kd, w, sk, tg, frames) in enumerate(built):
            n = len(ids) - 1
            inp[b, :n], tgt[b, :n], slots[b, :n], skip[b, :n] = ids[:-1], tg[1:], sl[:-1], sk[:-1]
            kind[b, :n], weight[b, :n] = kd[1:], w[1:]
            for p in frames:
                frame_index.append(b * T + p)
                frame_target.append(ids[p + 1 : p + 1 + lay.obs_len])
        batch = {"input": torch.from_numpy(inp), "target": torch.from_numpy(tgt), "weight": torch.from_numpy(weight),
                 "slots": torch.from_numpy(slots)}
        if self.step_skip:
            batch["skip"] = torch.from_numpy(skip)
        for name, k in PARTS.items():
            batch[f"part_{name}"] = torch.from_numpy((kind == k) & (weight > 0))
        if self.frame_head:
            batch["frame_index"] = torch.tensor(frame_index, dtype=torch.long)
            batch["frame_target"] = (torch.from_numpy(np.stack(frame_target)) if frame_target
                                     else torch.zeros(0, lay.obs_len, dtype=torch.long))
            batch["frame_weight"] = torch.tensor(self.cfg.weight_frame)
        return batch

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> dict:
        """Rows packed with random episodes (each behind its own mission prefix) up to context+1 tokens."""
        eps = self.splits[split]
        rows = []
        for _ in range(batch_size):
            segments, n = [], 0
            while n < context + 1:
                seq, P, policy, *skip = self.row(eps[int(torch.randint(len(eps), (1,), generator=generator))], context, gen=generator)
                if self.step_cost != self.layout.step_len:  # cut at whole steps, counted in model positions
                    fit = (context + 1 - n - P) // self.step_cost
                    if fit < 1:
                        break
                    steps = min(fit, (len(seq) - P) // self.layout.step_len)
                    seq, policy = seq[: P + steps * self.layout.step_len], policy[:steps]
                    skip = [k[: len(seq)] for k in skip]
                    n += P + steps * self.step_cost
                else:
                    n += len(seq)
                segments.append((seq, P, policy, *skip))
            rows.append(segments)
        return self.collate(rows, length=context + 1 if self.step_cost == self.layout.step_len else None)

    def windows(self, split: str, context: int, batch_size: int):
        """Every episode of a split once (its first window, one per row), in batches."""
        eps = self.splits[split]
        for i in range(0, len(eps), batch_size):
            yield self.collate([[self.row(e, context, start=0)] for e in eps[i : i + batch_size]])

