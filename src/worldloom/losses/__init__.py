"""Objectives: small pure functions over the model's output (``ModelOutput``) and a batch.

The model computes (``LWM.forward``: logits, hidden states, frame logits, auxiliary losses);
an objective only scores. Every objective returns a ``LossOutput``: the total to
backpropagate and named float parts to log (``loss`` is the weighted next-token
cross-entropy, the figure comparable to the held-out loss, wherever there is one; a masked-only
objective logs ``loss_masked`` instead).

    next_token.py   next_token_loss (fp32 cross-entropy, optional per-position weights)
    world.py        per-modality parts and the frame head's loss of a world stream
    moe.py          the mixture-of-experts auxiliary loss and load figures
    masked.py       masked_lm_loss (fill-mask), combined_loss (next + alpha * masked), text_objective
    objectives.py   language_model_loss, world_stream_loss: what the recipes train on
    image.py        image_objective: an image tokenizer's reconstruction + commitment loss
"""

from .base import LossOutput
from .image import image_objective
from .masked import combined_loss, masked_lm_loss, masked_token_loss, text_objective
from .moe import add_moe_aux
from .next_token import next_token_loss
from .objectives import language_model_loss, world_stream_loss
from .world import frame_loss, modality_parts

__all__ = ["LossOutput", "add_moe_aux", "combined_loss", "frame_loss", "image_objective", "language_model_loss", "masked_lm_loss",
           "masked_token_loss", "modality_parts", "next_token_loss", "text_objective", "world_stream_loss"]
