"""Tokenizers, one per modality, all with the same protocol:

``encode(x) -> LongTensor``, ``decode(ids) -> x``, ``vocab_size``, ``save(dir)``, ``load(dir)``.
"""

from .grid import GridTokenizer, ScalarBins
from .text import TextTokenizer

__all__ = ["GridTokenizer", "ScalarBins", "TextTokenizer"]
