"""`worldloom fill`: a model trained with a masked objective puts one token in place of each ``<mask>``.

Every pass is bidirectional (``LWM.forward(causal=False)``): each masked position sees the whole
text, before and after it. By default the masks are filled one at a time, the one the model is
most confident about first, each filled token then being context for the rest (as in
Mask-Predict-style decoding); ``parallel=True`` fills all of them from one pass.
"""

from __future__ import annotations

import torch

from .errors import WorldloomError

FILL_OBJECTIVES = ("masked", "combined")  # the train.objective values whose models learned to fill <mask>


def check_fill_run(run, name: str) -> None:
    """WorldloomError unless ``run`` is a text model trained with a masked objective."""
    objective = run.cfg.train.objective
    if run.is_world or objective not in FILL_OBJECTIVES or run.tokenizer.mask_id is None:
        raise WorldloomError(f"{name} was trained with train.objective={objective}{' (a world model)' if run.is_world else ''}: "
                             "it never learned to fill <mask>; train a text run with train.objective=masked or combined")


@torch.no_grad()
def fill_masks(model, tokenizer, text: str, parallel: bool = False) -> str:
    """``text`` with each ``<mask>`` replaced by the model's likeliest token (never ``<mask>`` itself)."""
    mask_id = tokenizer.mask_id
    ids = tokenizer.encode(text)  # (T,)
    todo = (ids == mask_id).nonzero().flatten().tolist()
    if not todo:
        raise WorldloomError("the text holds no <mask> to fill; write <mask> where a token should go")
    if len(ids) > model.cfg.context:
        raise WorldloomError(f"the text is {len(ids)} tokens long, more than the model's context of {model.cfg.context}")
    model.eval()
    while todo:
        logits = model(ids[None], causal=False).logits[0, todo].float()  # (M, V) at the open masks
        logits[:, mask_id] = float("-inf")
        conf, best = logits.softmax(-1).max(-1)  # (M,)
        pick = range(len(todo)) if parallel else [int(conf.argmax())]
        for j in pick:
            ids[todo[j]] = best[j]
        todo = [p for j, p in enumerate(todo) if j not in pick]
    return tokenizer.decode(ids)
