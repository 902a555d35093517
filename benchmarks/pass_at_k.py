#!/usr/bin/env python
"""pass@K of a text run on checkable task rows: the share of prompts answered right at least once in K
samples at temperature 1 — the ceiling of what learning from the run's own samples can reach.

    python benchmarks/pass_at_k.py RUN TEST.jsonl [K]        # e.g. runs/sft data/instr/test.jsonl 16
"""

import json
import sys
import time

from worldloom.run import load_run
from worldloom.tune.common import answers
from worldloom.tune.data import read_prompts
from worldloom.tune.tasks import check


def main(run_dir: str, path: str, k: int = 16) -> dict:
    run = load_run(run_dir)
    rows = [r for r in read_prompts(path) if r.get("task")]
    t = time.time()
    got = answers(run.model, run.tokenizer, run.cfg, [r["prompt"] for r in rows for _ in range(k)], temperature=1.0, seed=123,
                  batch=256, max_new_tokens=12)
    ok = [[check(r, got[i * k + j]) for j in range(k)] for i, r in enumerate(rows)]
    per: dict[str, list[bool]] = {}
    for r, o in zip(rows, ok):
        per.setdefault(r["task"], []).append(any(o))
    return {"K": k, "pass_at_k": sum(any(o) for o in ok) / len(ok), "pass_at_1_sampled": sum(sum(o) for o in ok) / (k * len(ok)),
            "per_task": {name: sum(v) / len(v) for name, v in per.items()}, "seconds": round(time.time() - t, 1)}


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 16)))
