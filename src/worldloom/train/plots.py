"""A run's metrics.jsonl: read it, trim it back to a checkpoint, and draw its loss curves headless
(matplotlib's Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write is skipped, not fatal
    return rows


def truncate_metrics(path: Path, upto: int, key: str = "step") -> None:
    """Drop the rows logged after the checkpoint a run resumes from (their ``key``, the step or the RL
    update, past ``upto``): a kill lost them and they are logged again."""
    from ..io import atomic_write_text

    if Path(path).exists():
        rows = [r for r in read_metrics(path) if r.get(key, 0) <= upto]
        atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


def plot_loss(metrics_path: Path, png_path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss", lw=1.5, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(png_path), buf.getvalue())
