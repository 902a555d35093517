"""Retrieval between two modalities of held-out items: R@1, R@5 both ways, and their chance levels.

Every held-out item's A embedding queries the B embeddings of all N held-out items (and the other
way). Many items share a caption or an action sequence, so a retrieved candidate counts as right
when its item and the query's item are the same in either modality of the pair (the same view,
caption or action sequence): ``equivalent``. R@k is the share of queries with a right candidate
among the k most similar. Chance R@k is what a uniformly random ranking scores: with c_i right
candidates among N, 1 - C(N - c_i, k) / C(N, k), averaged over the queries.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KS = (1, 5)


def content_ids(values: np.ndarray) -> np.ndarray:
    """(N, ...) rows -> (N,) int ids, equal where the rows are equal."""
    values = np.asarray(values)
    if values.ndim == 1:
        return np.unique(values, return_inverse=True)[1].reshape(-1)
    return np.unique(values.reshape(len(values), -1), axis=0, return_inverse=True)[1].reshape(-1)


def equivalent(ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
    """(N, N) bool: items i and j agree in modality A or in modality B (content ids)."""
    return (ids_a[:, None] == ids_a[None]) | (ids_b[:, None] == ids_b[None])


def recall_at(sim: torch.Tensor, right: np.ndarray, k: int) -> float:
    """sim (N, M) query x candidate, right (N, M) bool: share of queries with a right candidate in their top k."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices.cpu().numpy()  # (N, k)
    return float(np.take_along_axis(right, top, axis=1).any(axis=1).mean())


def chance_at(right: np.ndarray, k: int) -> float:
    """Expected recall@k of a uniformly random ranking."""
    n = right.shape[1]
    k = min(k, n)
    miss = [math.comb(n - int(c), k) / math.comb(n, k) for c in right.sum(axis=1)]
    return float(1.0 - np.mean(miss))


def retrieval(emb_a: torch.Tensor, emb_b: torch.Tensor, right: np.ndarray) -> dict:
    """Both directions of one pair: {"a_to_b": {"r1", "r5", "chance_r1", "chance_r5"}, "b_to_a": {...}}."""
    sim = emb_a.float() @ emb_b.float().T  # (N, N): A queries x B candidates
    out = {}
    for name, s, r in (("a_to_b", sim, right), ("b_to_a", sim.T, right.T)):
        out[name] = {**{f"r{k}": recall_at(s, r, k) for k in KS}, **{f"chance_r{k}": chance_at(r, k) for k in KS}}
    return out
