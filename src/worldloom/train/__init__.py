"""Training: one loop for every recipe's task (``model(**inputs) -> task.objective -> LossOutput``)."""

from .loop import train

__all__ = ["train"]
