"""Text tokenizers on Hugging Face `tokenizers`.

* ``char``: one token per character seen in the training text, plus 256 byte tokens
  (``<0x00>`` … ``<0xFF>``) as a fallback, so any Unicode string round-trips exactly, even
  characters never seen in training (they become their UTF-8 bytes).
* ``bpe``: byte-level BPE learned on the training text (GPT-2 style), exact for any string.
* ``word``: one token per whitespace-separated word seen in training, plus ``[UNK]``; for
  the small closed vocabularies of environment missions ("go to the red ball").

Both save one ``tokenizer.json`` that `transformers.PreTrainedTokenizerFast` also loads.
* ``hf``: a ``tokenizer.json`` that came with a Hugging Face model (`worldloom import hf`),
  used as it is (``TextTokenizer.from_file``); a run never learns one.

Runs trained with a masked objective (``train.objective=masked|combined``) get one more token,
``<mask>``, added as a special token after every other (``mask=True``): the ids of the others
do not move, and ``<mask>`` written in a text encodes to it. Other tokenizers (and the ones of
existing run folders) are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import CheckpointError, ConfigError, DataError
from ..io import atomic_write_text, read_json, write_json


MASK = "<mask>"  # the fill-mask token of runs trained with a masked objective


class TextTokenizer:
    """Protocol: encode(str) -> LongTensor, decode(ids) -> str, vocab_size, save(dir), load(dir)."""

    modality = "text"

    def __init__(self, tok: Tokenizer, kind: str):
        self.tok = tok
        self.kind = kind

    # -- construction
    @classmethod
    def train(cls, kind: str, text: str, vocab_size: int = 4096, mask: bool = False) -> "TextTokenizer":
        """A tokenizer learned from ``text``; ``mask``: with a ``<mask>`` token as its last id."""
        if not text:
            raise DataError("cannot train a tokenizer on empty text")
        if kind == "hf":
            raise ConfigError("tokenizer.kind=hf is a tokenizer imported with its model (worldloom import hf); "
                              "a new run learns tokenizer.kind=char or bpe")
        builders = {"char": _char_tokenizer, "bpe": lambda t: _bpe_tokenizer(t, vocab_size), "word": _word_tokenizer}
        if kind not in builders:
            raise ValueError(f"unknown text tokenizer kind {kind!r}")
        tok = builders[kind](text)
        if mask:
            tok.add_special_tokens([AddedToken(MASK, special=True, normalized=False)])
        return cls(tok, kind)

    @property
    def mask_id(self) -> int | None:
        """The id of ``<mask>``, or None for a tokenizer without one (trained for next-token prediction)."""
        return self.tok.token_to_id(MASK)

    # -- protocol
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> torch.Tensor:
        try:
            ids = self.tok.encode(text).ids
        except TypeError:  # lone surrogates: what Python makes of bytes that are not UTF-8
            raise DataError("text is not valid Unicode (it holds lone surrogates, e.g. from non-UTF-8 bytes)") from None
        return torch.tensor(ids, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.tok.to_str())
        write_json(folder / "tokenizer_meta.json", {"modality": "text", "kind": self.kind, "vocab_size": self.vocab_size})

    @classmethod
    def load(cls, folder: Path) -> "TextTokenizer":
        folder = Path(folder)
        meta = read_json(folder / "tokenizer_meta.json", "tokenizer metadata")
        return cls.from_file(folder / "tokenizer.json", meta.get("kind", "bpe"))

    @classmethod
    def from_file(cls, path: Path, kind: str = "hf") -> "TextTokenizer":
        """A ``tokenizer.json`` as it is (a run folder's, or one from a Hugging Face model folder)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"tokenizer file {path} is corrupt ({str(e).splitlines()[0][:100]})") from None
        return cls(tok, kind)


def _char_tokenizer(text: str) -> Tokenizer:
    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)}
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _word_tokenizer(text: str) -> Tokenizer:
    words = sorted(set(text.split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunk = 1 << 16  # feed lines in chunks so huge files do not become one giant string
    tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
    return tok
