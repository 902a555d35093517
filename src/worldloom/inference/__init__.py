"""Inference: turning a model's outputs into tokens (`sampling.sample`, the one sampler)."""

from .sampling import check_sampling, restrict, sample

__all__ = ["check_sampling", "restrict", "sample"]
