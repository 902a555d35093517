"""Text runs for the server's tests (test_serve.py, test_serve_openai.py): random, built in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import SHORT_TEXT

from worldloom.config import ModelConfig, RunConfig, save_yaml, to_dict


def text_run(folder: Path, chat: str | None = None, context: int = 96, **model) -> Path:
    """A random text run with O(1) weights (untied head: a distribution flat enough that samples differ);
    ``chat``: marked as tuned, so it has a chat template, whose answers end at the string ``chat``."""
    from worldloom.checkpoint import save_checkpoint
    from worldloom.model import LWM
    from worldloom.tokenize import TextTokenizer

    tok = TextTokenizer.train("char", SHORT_TEXT, vocab_size=300)
    mc = ModelConfig(n_layer=2, n_head=2, d_model=32, context=context, tie_weights=False, vocab_size=tok.vocab_size,
                     **model)
    cfg = RunConfig(name=folder.name, out_dir=str(folder.parent), model=mc)
    if chat:
        cfg.tune.base = str(folder)  # provenance only: a run without LoRA loads its own weights
        cfg.tune.stop = chat
    torch.manual_seed(0)
    m = LWM(mc)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
        byte = torch.tensor([tok.tok.id_to_token(i).startswith("<0x") for i in range(tok.vocab_size)])
        m.head.weight[byte] = 0.0  # byte-fallback tokens unlikely: the text stays readable, token by token
        m.head.weight[~byte] *= 5.0
    save_checkpoint(folder, m, None, {"step": 0, "elapsed": 0.0})
    tok.save(folder / "tokenizer")
    save_yaml(to_dict(cfg), folder / "config.yaml")
    return folder
