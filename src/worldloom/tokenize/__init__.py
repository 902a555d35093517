"""Tokenizers, one per modality.

Text (``text.py``): ``encode(x) -> LongTensor``, ``decode(ids) -> x``, ``vocab_size``,
``save(dir)``, ``load(dir)``. Observations: the `ObsTokenizer` protocol and registry
(``base.py``), the MiniGrid grid tokenizer (``grid.py``). Scalars: `ScalarBins` (``bins.py``).
"""

from .base import OBS_TOKENIZERS, ObsTokenizer, load_obs_tokenizer, register_obs_tokenizer
from .bins import ScalarBins
from .grid import GridTokenizer
from .text import TextTokenizer

__all__ = ["OBS_TOKENIZERS", "GridTokenizer", "ObsTokenizer", "ScalarBins", "TextTokenizer", "load_obs_tokenizer",
           "register_obs_tokenizer"]
