"""Text tokenizers: exact round trips for any Unicode string, save/load, vocabulary sizes."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worldloom.errors import CheckpointError, DataError
from worldloom.tokenize import TextTokenizer

BPE_VOCAB = 320
KINDS = ["char", "bpe"]


@pytest.fixture(scope="module")
def toks(corpus_text, tmp_path_factory):
    """{kind: (trained, reloaded)}: each tokenizer trained once, then saved and loaded back."""
    out = {}
    for kind in KINDS:
        tok = TextTokenizer.train(kind, corpus_text, vocab_size=BPE_VOCAB)
        folder = tmp_path_factory.mktemp(f"tok-{kind}")
        tok.save(folder)
        out[kind] = (tok, TextTokenizer.load(folder), folder)
    return out


def corpus_chars(text: str) -> list[str]:
    return sorted(set(text))


# any Unicode string, and strings mixing seen characters with unseen ones
ANY_TEXT = st.text()
MIXED_TEXT = st.text(alphabet=st.one_of(st.sampled_from(sorted(set("the cat sat café naïve über .\n"))), st.characters(codec="utf-8")))
EXAMPLES = ["", " ", "\x00", "\n\n\t  \r\n", "héllo wörld 😀 日本語 \u200b", "<0x41><0xFF>", "\ufffd", "a" * 300,
            "Ünïcödé 𝔘𝔫𝔦 \U0010ffff", "  leading and trailing spaces  ", "The cat sat on the mat.\n"]


def check_roundtrip(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert len(ids) == 0 or (0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=250)
@given(text=ANY_TEXT)
@example(text="")
def test_roundtrip_any_unicode(toks, kind, text):
    check_roundtrip(toks[kind][0], text)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150)
@given(text=MIXED_TEXT)
def test_roundtrip_mixed_seen_and_unseen(toks, kind, text):
    check_roundtrip(toks[kind][0], text)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", EXAMPLES)
def test_roundtrip_examples(toks, kind, text):
    check_roundtrip(toks[kind][0], text)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150)
@given(text=ANY_TEXT)
def test_save_load_gives_identical_ids(toks, kind, text):
    tok, back, _ = toks[kind]
    assert torch.equal(back.encode(text), tok.encode(text))
    assert back.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_metadata(toks, kind):
    tok, back, folder = toks[kind]
    assert back.kind == tok.kind == kind
    assert back.vocab_size == tok.vocab_size
    meta = json.loads((folder / "tokenizer_meta.json").read_text())
    assert meta == {"modality": "text", "kind": kind, "vocab_size": tok.vocab_size}
    assert (folder / "tokenizer.json").is_file()


def test_char_vocab_is_seen_chars_plus_bytes(toks, corpus_text):
    tok = toks["char"][0]
    chars = corpus_chars(corpus_text)
    assert tok.vocab_size == len(chars) + 256
    # one token per seen character, in sorted order
    assert tok.encode("".join(chars)).tolist() == list(range(len(chars)))


def test_char_unseen_character_falls_back_to_utf8_bytes(toks, corpus_text):
    tok = toks["char"][0]
    assert "😀" not in corpus_text
    ids = tok.encode("😀").tolist()
    assert len(ids) == len("😀".encode()) == 4
    assert all(i >= len(corpus_chars(corpus_text)) for i in ids)
    assert tok.decode(ids) == "😀"


def test_bpe_vocab_size_matches_request_and_compresses(toks, corpus_text):
    tok = toks["bpe"][0]
    assert tok.vocab_size == BPE_VOCAB
    sample = corpus_text[:2000]
    assert len(tok.encode(sample)) < 0.6 * len(sample.encode())  # merges were learned and used


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_matches_encode(toks, kind):
    tok = toks[kind][0]
    texts = ["the cat", "", "über 😀", "a b c"]
    assert tok.encode_batch(texts) == [tok.encode(t).tolist() for t in texts]


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic(corpus_text, toks, kind):
    again = TextTokenizer.train(kind, corpus_text, vocab_size=BPE_VOCAB)
    assert again.tok.to_str() == toks[kind][0].tok.to_str()


def test_train_on_empty_text_is_a_data_error():
    with pytest.raises(DataError):
        TextTokenizer.train("char", "")


def test_load_missing_or_corrupt(tmp_path, toks):
    with pytest.raises(CheckpointError, match="not found"):
        TextTokenizer.load(tmp_path)
    folder = toks["char"][2]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_meta.json").write_text((folder / "tokenizer_meta.json").read_text())
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        TextTokenizer.load(broken)
    (broken / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        TextTokenizer.load(broken)
