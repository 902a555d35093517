"""`worldloom eval` of a bind run: retrieval between every pair of modalities on the held-out items."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from ..tokenize import TextTokenizer
from .data import TOKENIZER_DIR, encode_rows
from .items import load_items
from .model import MODALITIES
from .retrieval import content_ids, equivalent, retrieval


@torch.no_grad()
def embed_all(model, rows: torch.Tensor, chunk: int = 512) -> dict[str, torch.Tensor]:
    """Every modality's embeddings of the rows: modality -> (N, dim)."""
    outs = [model(rows[i:i + chunk]).embeddings for i in range(0, len(rows), chunk)]
    return {k: torch.cat([o[k] for o in outs]) for k in MODALITIES}


def item_contents(items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """modality -> (N,) content ids: equal where two items show the same view / caption / action sequence."""
    view = np.concatenate([items["image"].reshape(len(items["image"]), -1), items["direction"].reshape(-1, 1)], axis=1)
    return {"view": content_ids(view), "text": content_ids(items["text"]), "actions": content_ids(items["actions"])}


def evaluate_bind(run, run_dir: Path) -> dict:
    from ..recipes.bind import ITEMS

    cfg = run.cfg
    items = load_items(Path(run_dir) / ITEMS / "val.npz")
    tok = TextTokenizer.load(Path(run_dir) / TOKENIZER_DIR)  # the training captions' words
    rows = encode_rows(items, tok, cfg.bind.view, cfg.bind.text_len)
    emb = embed_all(run.model.eval(), rows)
    ids = item_contents(items)
    trained = {frozenset(p) for p in cfg.bind.pair_list()}
    pairs = {}
    for a, b in combinations(MODALITIES, 2):
        r = retrieval(emb[a], emb[b], equivalent(ids[a], ids[b]))
        pairs[f"{a}-{b}"] = {"trained": frozenset((a, b)) in trained, f"{a}_to_{b}": r["a_to_b"], f"{b}_to_{a}": r["b_to_a"]}
    return {"run": str(run_dir), "step": run.state["step"], "env_id": cfg.env.id, "items": len(rows),
            "distinct": {k: int(v.max()) + 1 for k, v in ids.items()}, "trained_pairs": sorted("-".join(p) for p in cfg.bind.pair_list()),
            "temperature": float(1.0 / run.model.scale.detach()), "pairs": pairs}


def table_rows(res: dict, run: str | None = None) -> list[str]:
    """Markdown rows, one per direction of every pair (with a first column naming the run when given)."""
    first = f"| {run} " if run is not None else ""
    return [f"{first}| {name.replace('_to_', ' -> ')} | {'yes' if pair['trained'] else 'no'} | {r['r1']:.1%} | {r['r5']:.1%} "
            f"| {r['chance_r1']:.1%} | {r['chance_r5']:.1%} |"
            for pair in res["pairs"].values() for name, r in pair.items() if name != "trained"]


TABLE_HEAD = ["| query -> candidates | trained together | R@1 | R@5 | chance R@1 | chance R@5 |",
              "| --- | --- | --- | --- | --- | --- |"]


def format_table(res: dict) -> str:
    """A Markdown table: one row per direction of every pair."""
    lines = [f"{res['run']} (step {res['step']}): retrieval among {res['items']:,} held-out items of {res['env_id']} "
             f"(distinct views {res['distinct']['view']}, captions {res['distinct']['text']}, action sequences {res['distinct']['actions']})",
             "", *TABLE_HEAD, *table_rows(res)]
    return "\n".join(lines)
