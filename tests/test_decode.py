"""Generation: cached == uncached, batched == alone, stop strings, streaming, rollover (the sampler alone: test_sampling)."""

from __future__ import annotations

import pytest
import torch

from worldloom.config import ModelConfig
from worldloom.decode import SamplingConfig, generate, generate_ids, left_pad, stream_batch
from worldloom.backbones.transformer import KVCache
from worldloom.model import LWM, ModelOutput
from worldloom.tokenize import TextTokenizer

GREEDY = dict(temperature=0.0)


def tokens(model, prompts, sc, use_cache=True) -> list[list[int]]:
    """generate_ids as one token list per row."""
    steps = list(generate_ids(model, prompts, sc, use_cache=use_cache))
    assert len(steps) == sc.max_new_tokens
    if not steps:
        return [[] for _ in prompts]
    return torch.stack(steps, dim=1).tolist()


def random_model(n_kv_head: int = 0, context: int = 16, vocab: int = 40, seed: int = 0) -> LWM:
    torch.manual_seed(seed)
    model = LWM(ModelConfig(n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, context=context, vocab_size=vocab))
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)  # peaked logits: no near-ties between greedy choices
    return model.eval()


def encode(tok, texts):
    return [tok.encode(t).tolist() for t in texts]


# ---------------------------------------------------------------- cache vs no cache


@pytest.mark.parametrize("prompt", ["T", "The cat", "A big red dog ran under the"])
def test_cached_greedy_equals_uncached_trained(loaded, prompt):
    ctx = loaded.cfg.model.context
    ids = encode(loaded.tokenizer, [prompt])
    sc = SamplingConfig(max_new_tokens=ctx - len(ids[0]), **GREEDY)
    assert tokens(loaded.model, ids, sc, use_cache=True) == tokens(loaded.model, ids, sc, use_cache=False)


@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_cached_greedy_equals_uncached_random(n_kv_head):
    model = random_model(n_kv_head)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13, 14]]
    for p in prompts:
        sc = SamplingConfig(max_new_tokens=16 - len(p), **GREEDY)
        assert tokens(model, [p], sc, True) == tokens(model, [p], sc, False)


def test_cached_sampling_equals_uncached_with_same_seed(loaded):
    ids = encode(loaded.tokenizer, ["The dog", "A"])
    sc = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=10, seed=5)
    assert tokens(loaded.model, ids, sc, True) == tokens(loaded.model, ids, sc, False)


# ---------------------------------------------------------------- batches of different lengths


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_left_padded_prompts_match_each_alone(loaded, use_cache):
    texts = ["T", "The cat sat", "A big red dog ran."]
    ids = encode(loaded.tokenizer, texts)
    assert len({len(p) for p in ids}) == 3
    sc = SamplingConfig(max_new_tokens=loaded.cfg.model.context - max(map(len, ids)), **GREEDY)
    batched = tokens(loaded.model, ids, sc, use_cache)
    for p, row in zip(ids, batched):
        assert tokens(loaded.model, [p], sc, use_cache)[0] == row


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_batched_matches_alone_random_model(n_kv_head):
    model = random_model(n_kv_head)
    prompts = [[3], [4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    sc = SamplingConfig(max_new_tokens=6, **GREEDY)
    batched = tokens(model, prompts, sc)
    for p, row in zip(prompts, batched):
        assert tokens(model, [p], sc)[0] == row


def test_left_pad():
    ids, pad = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert pad.tolist() == [0, 2]
    with pytest.raises(ValueError):
        left_pad([[1], []])
    with pytest.raises(ValueError):
        left_pad([])


def test_seeded_sampling_is_repeatable(loaded):
    ids = encode(loaded.tokenizer, ["The"])
    sc = SamplingConfig(max_new_tokens=20, temperature=1.2, seed=11)
    assert tokens(loaded.model, ids, sc) == tokens(loaded.model, ids, sc)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=-1), dict(temperature=-0.1), dict(temperature=float("nan")),
                                dict(temperature=float("inf")), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(top_p=float("nan"))])
def test_sampling_config_validation(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)


# ---------------------------------------------------------------- stop strings and streaming


def test_stop_string_cuts_output_and_is_excluded(loaded):
    m, tok = loaded.model, loaded.tokenizer
    sc = SamplingConfig(max_new_tokens=24, **GREEDY)
    [full] = generate(m, tok, ["The cat"], sc)
    assert len(full) >= 12, full
    stop = full[6:9]
    expected = full[: full.find(stop)]
    [out] = generate(m, tok, ["The cat"], sc, stop=[stop])
    assert out == expected
    assert stop not in out
    # two stops: the earliest in the text wins; a stop that never occurs changes nothing
    other = full[9:11]
    first = min(full.find(stop), full.find(other))
    assert generate(m, tok, ["The cat"], sc, stop=[stop, other])[0] == full[:first]
    assert generate(m, tok, ["The cat"], sc, stop=["\x00never\x00"])[0] == full
    assert generate(m, tok, ["The cat"], sc, stop=[full[:2]])[0] == ""


def test_stop_strings_end_each_row_separately(loaded):
    m, tok = loaded.model, loaded.tokenizer
    sc = SamplingConfig(max_new_tokens=20, **GREEDY)
    prompts = ["The cat", "A dog"]
    full = generate(m, tok, prompts, sc)
    stop = full[0][4:6]
    out = generate(m, tok, prompts, sc, stop=[stop])
    for f, o in zip(full, out):
        assert o == (f[: f.find(stop)] if stop in f else f)


def test_stream_batch_pieces_concatenate_to_generate(loaded):
    m, tok = loaded.model, loaded.tokenizer
    prompts = ["The", "A small bird", "über"]
    sc = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    pieces: list[list[str]] = [[] for _ in prompts]
    for i, text in stream_batch(m, tok, prompts, sc):
        assert text  # no empty pieces
        pieces[i].append(text)
    streamed = ["".join(p) for p in pieces]
    assert streamed == generate(m, tok, prompts, sc)
    # and both are the decoded token ids
    reference = tokens(m, encode(tok, prompts), sc)
    assert streamed == [tok.decode(r) for r in reference]
    assert all(len(p) > 1 for p in pieces)  # it really streams


def test_stream_with_stop_never_emits_stop_text(loaded):
    m, tok = loaded.model, loaded.tokenizer
    sc = SamplingConfig(max_new_tokens=24, **GREEDY)
    [full] = generate(m, tok, ["The cat"], sc)
    stop = full[8:11]
    pieces = [t for _, t in stream_batch(m, tok, ["The cat"], sc, stop=[stop])]
    assert "".join(pieces) == full[: full.find(stop)]


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy choice after the prompt is a fixed script of token ids."""

    def __init__(self, script, prompt_len, vocab, context=32):
        super().__init__()
        self.cfg = ModelConfig(n_layer=1, n_head=2, d_model=8, context=context, vocab_size=vocab)
        self.script, self.prompt_len = script, prompt_len
        self.w = torch.nn.Parameter(torch.zeros(1))

    def new_cache(self, batch, max_len, pad=None):
        return KVCache(1, batch, max_len, pad)

    def forward(self, idx, cache=None):
        if cache is not None:
            cache.length += idx.shape[1]
        seen = cache.length if cache is not None else idx.shape[1]
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.cfg.vocab_size)
        logits[:, -1, self.script[min(seen - self.prompt_len, len(self.script) - 1)]] = 1.0
        return ModelOutput(logits, logits, cache)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_stream_holds_back_incomplete_utf8(corpus_text, kind):
    """A multi-byte character split over byte tokens is streamed whole, never as U+FFFD."""
    tok = TextTokenizer.train(kind, corpus_text, vocab_size=300)
    target = "😀x🙂 日本"  # unseen characters: several byte tokens each
    script = tok.encode(target).tolist()
    assert len(script) > len(target)
    model = Scripted(script, len(tok.encode("T")), tok.vocab_size)
    sc = SamplingConfig(max_new_tokens=len(script), **GREEDY)
    assert tokens(model, [tok.encode("T").tolist()], sc)[0] == script  # the stand-in does follow the script
    pieces = [t for _, t in stream_batch(model, tok, ["T"], sc)]
    assert "".join(pieces) == target
    assert all("\ufffd" not in p for p in pieces), pieces
    assert generate(model, tok, ["T"], sc) == [target]


def test_stop_string_split_over_tokens(loaded):
    """A stop string that arrives token by token is never partly emitted."""
    tok = loaded.tokenizer
    script = tok.encode("ab😀cd").tolist()
    model = Scripted(script, 1, tok.vocab_size)
    sc = SamplingConfig(max_new_tokens=len(script), **GREEDY)
    pieces = [t for _, t in stream_batch(model, tok, ["T"], sc, stop=["b😀c"])]
    assert "".join(pieces) == "a"
    pieces = [t for _, t in stream_batch(model, tok, ["T"], sc, stop=["😀c", "zz"])]
    assert "".join(pieces) == "ab"


# ---------------------------------------------------------------- longer than the context


def reference_rollover(model, prompt, n):
    """Greedy decoding with the documented rollover, by full forwards (no cache)."""
    ctx = model.cfg.context
    seq = list(prompt)
    start = max(0, len(seq) - ctx)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq[start:]])).logits
            t = int(logits[0, -1].argmax())
            out.append(t)
            if len(seq) - start >= ctx:  # the cache was full: rebuild it from the last half-context
                start = len(seq) + 1 - max(1, ctx // 2)
            seq.append(t)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_longer_than_context(loaded, use_cache):
    ctx = loaded.cfg.model.context
    ids = encode(loaded.tokenizer, ["The cat"])
    sc = SamplingConfig(max_new_tokens=3 * ctx + 5, temperature=0.8, seed=1)
    out = tokens(loaded.model, ids, sc, use_cache)  # asserts exactly max_new_tokens steps
    assert len(out[0]) == 3 * ctx + 5
    if use_cache:  # generate() decodes with the cache
        assert generate(loaded.model, loaded.tokenizer, ["The cat"], sc)[0] == loaded.tokenizer.decode(out[0])


def test_rollover_matches_reference(loaded):
    ctx = loaded.cfg.model.context
    prompt = encode(loaded.tokenizer, ["The big dog"])[0]
    n = 2 * ctx + 3
    sc = SamplingConfig(max_new_tokens=n, **GREEDY)
    cached = tokens(loaded.model, [prompt], sc, use_cache=True)[0]
    assert cached == reference_rollover(loaded.model, prompt, n)
    # up to the first rollover, the cache changes nothing
    uncached = tokens(loaded.model, [prompt], sc, use_cache=False)[0]
    k = ctx - len(prompt) + 1
    assert cached[:k] == uncached[:k]


def test_prompt_longer_than_context(loaded):
    ctx = loaded.cfg.model.context
    prompt = encode(loaded.tokenizer, ["The cat sat on the mat and then the dog ran under the log slowly."])[0]
    assert len(prompt) > ctx
    sc = SamplingConfig(max_new_tokens=ctx, **GREEDY)
    cached = tokens(loaded.model, [prompt], sc, use_cache=True)[0]
    assert cached == reference_rollover(loaded.model, prompt, ctx)
    # the first token only sees the last `context` tokens of the prompt
    assert cached[0] == tokens(loaded.model, [prompt[-ctx:]], SamplingConfig(max_new_tokens=1, **GREEDY))[0][0]


def test_zero_new_tokens(loaded):
    sc = SamplingConfig(max_new_tokens=0, **GREEDY)
    assert generate(loaded.model, loaded.tokenizer, ["The", "A"], sc) == ["", ""]


# ---------------------------------------------------------------- fixed-shape step (for torch.compile)


@pytest.mark.parametrize("n_kv_head", [0, 2])
@pytest.mark.parametrize("pad", [None, [0, 3]])
def test_decode_step_equals_incremental_forward(n_kv_head, pad):
    """decode_step (whole cache under a mask, slot as a tensor) gives forward()'s logits."""
    model = random_model(n_kv_head)
    x = torch.randint(0, 40, (2, 10))
    pad_t = None if pad is None else torch.tensor(pad)
    with torch.inference_mode():
        ref_cache, step_cache = model.new_cache(2, 16, pad_t), model.new_cache(2, 16, pad_t)
        model(x[:, :4], ref_cache)
        model(x[:, :4], step_cache)
        for t in range(4, 10):
            want = model(x[:, t : t + 1], ref_cache).logits[:, -1]
            got = model.decode_step(x[:, t : t + 1], step_cache, torch.tensor(step_cache.length))
            step_cache.length += 1
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_generation_equals_eager():
    model = random_model(context=24)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]  # left padding and rollover (24 -> 12) both happen
    sc = SamplingConfig(max_new_tokens=30, temperature=0.0)
    eager = torch.stack(list(generate_ids(model, prompts, sc)), 1)
    compiled = torch.stack(list(generate_ids(model, prompts, sc, compile=True)), 1)
    assert torch.equal(eager, compiled)
