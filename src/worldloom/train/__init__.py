"""Training: one loop for every trainable part (`compute_loss(batch) -> LossOutput`)."""

from .loop import prepare_text, train

__all__ = ["train", "prepare_text"]
