"""Speculative decoding (worldloom.inference.verify / speculative): cache rewinds for attention and
recurrent states, greedy output token-for-token the plain one for every backbone and drafter
(batched, left-padded, past the context), the sampling rule keeps the target's distribution."""

from __future__ import annotations

import copy

import pytest
import torch

from test_backbones import CASES, CTX, V, make_model
from worldloom.backbones.mamba import MambaMixer
from worldloom.backbones.mamba2 import Mamba2Mixer
from worldloom.decode import SamplingConfig, generate_ids
from worldloom.inference.speculative import LookupDrafter, ModelDrafter, SpecStats
from worldloom.inference.verify import accept, emit, mark, rewind


def run(model, prompts, n, **kw):
    sc = SamplingConfig(max_new_tokens=n, temperature=kw.pop("temperature", 0.0), seed=kw.pop("seed", None))
    return torch.stack(list(generate_ids(model, prompts, sc, **kw)), 1)  # (B, n)


def spec_model(case: str, seed: int = 0, **kw):
    """A test backbone with an untied random head: greedy outputs vary (a tied one repeats its input)."""
    model = make_model(case, seed, tie_weights=False, **kw)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 100))
        g = torch.Generator().manual_seed(seed + 200)
        for m in model.backbone.modules():  # mixers that matter (GPT-2 init leaves a near-identity stack):
            if isinstance(m, torch.nn.Linear):  # a state that kept a refused draft shows in the output
                m.weight.normal_(0.0, m.in_features ** -0.5, generator=g)
            if isinstance(m, MambaMixer):
                m.dt_proj.bias.sub_(3.0)  # long memories
            if isinstance(m, Mamba2Mixer):
                m.dt_bias.sub_(3.0)
    return model


def noisy(model, scale: float = 0.3, seed: int = 7):
    """A draft that agrees with the target often but not always: its head plus noise."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        draft.head.weight.add_(torch.randn(draft.head.weight.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return draft


def prompts(seed=3, lengths=(5, 9, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------- rewinds


@pytest.mark.parametrize("case", ["transformer", "mamba", "retnet", "hybrid"])
def test_rewind_then_feed_equals_never_having_fed(case):
    """Feed 6 tokens, rewind to keep 2 of them, feed 3 others: same logits and cache as feeding
    those 2 + 3 in the first place."""
    model = make_model(case)
    g = torch.Generator().manual_seed(0)
    head, extra, other = (torch.randint(0, V, (2, n), generator=g) for n in (4, 6, 3))
    with torch.no_grad():
        cache = model.new_cache(2, CTX)
        model(head, cache)
        m = mark(cache)
        model(extra, cache)
        refeed = rewind(cache, m, 4 + 2)
        if case == "transformer":
            assert refeed == 0 and cache.length == 6
        else:
            assert refeed == 2 and cache.length == 4  # states back to the mark: the caller feeds 2 again
        got = model(torch.cat([extra[:, 2 - refeed : 2], other], 1), cache).logits[:, -3:]
        fresh = model.new_cache(2, CTX)
        want = model(torch.cat([head, extra[:, :2], other], 1), fresh).logits[:, -3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache.length == fresh.length == 9


def test_rewind_refuses_going_before_the_mark():
    model = make_model("transformer")
    with torch.no_grad():
        cache = model.new_cache(1, CTX)
        model(torch.zeros(1, 3, dtype=torch.long), cache)
        m = mark(cache)
        model(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cannot rewind"):
        rewind(cache, m, 2)
    with pytest.raises(ValueError, match="cannot rewind"):
        rewind(cache, m, 6)


# ---------------------------------------------------------------- acceptance rule


def test_greedy_acceptance_hand_worked():
    logits = torch.full((3, 4, 5), -1.0)
    for b, choice in enumerate([[1, 2, 3, 4], [1, 0, 3, 4], [2, 2, 2, 2]]):
        for i, c in enumerate(choice):
            logits[b, i, c] = 1.0
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    n, fix = accept(logits, draft, torch.tensor([3, 3, 3]), 0.0)
    assert n.tolist() == [3, 1, 0] and fix.tolist() == [4, 0, 2]
    n, fix = accept(logits, draft, torch.tensor([2, 3, 3]), 0.0)  # row 0 has only 2 real drafts
    assert n.tolist() == [2, 1, 0] and fix.tolist() == [3, 0, 2]
    out = emit(draft, torch.tensor([3, 1, 2]), torch.tensor([4, 0, 2]))  # m = 1: row 0 and 2 keep draft 1
    assert out.tolist() == [[1, 2], [1, 0], [1, 2]]


@pytest.mark.parametrize("drafter", ["deterministic", "distribution"])
def test_speculative_sampling_keeps_the_target_distribution(drafter):
    """Many draws of the first emitted token through accept(): its histogram matches the target's
    softmax (total variation < 0.02 at 40,000 draws; the sampling error there is ~0.006)."""
    g = torch.Generator().manual_seed(0)
    Vs, N = 6, 40_000
    p_logits = torch.randn(Vs, generator=g) * 1.5
    q = torch.softmax(torch.randn(Vs, generator=g) * 1.5, -1)
    logits = p_logits.expand(N, 2, Vs).clone()
    if drafter == "deterministic":  # prompt lookup: always proposes id 2
        draft, qd = torch.full((N, 1), 2), None
    else:
        draft = torch.multinomial(q.expand(N, Vs), 1, replacement=True, generator=g)
        qd = q.expand(N, 1, Vs)
    n, fix = accept(logits, draft, torch.ones(N, dtype=torch.long), 1.0, draft_probs=qd, generator=g)
    first = torch.where(n > 0, draft[:, 0], fix)
    hist = torch.bincount(first, minlength=Vs).float() / N
    tv = 0.5 * (hist - torch.softmax(p_logits, -1)).abs().sum()
    assert tv < 0.02, (hist, torch.softmax(p_logits, -1))
    assert 0 < int((n > 0).sum()) < N  # both branches taken


# ---------------------------------------------------------------- greedy equality, every backbone


@pytest.mark.parametrize("case", sorted(CASES))
def test_lookup_greedy_equals_plain(case):
    model = spec_model(case)
    ps = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 5, 6, 5], [7, 8]]  # repeats, so lookup proposes
    want = run(model, ps, 14)
    stats = SpecStats()
    got = run(model, ps, 14, drafter=LookupDrafter(), draft_tokens=3, stats=stats)
    assert torch.equal(got, want)
    assert stats.verifications > 0 and stats.tokens == 14


@pytest.mark.parametrize("case", sorted(CASES))
def test_draft_model_greedy_equals_plain(case):
    model = spec_model(case)
    want = run(model, prompts(), 16)
    for draft in (noisy(model), spec_model("transformer", seed=5, n_layer=1)):  # same and other architecture
        stats = SpecStats()
        got = run(model, prompts(), 16, drafter=ModelDrafter(draft), draft_tokens=4, stats=stats)
        assert torch.equal(got, want)
    assert 0 < stats.accepted < stats.drafted or draft is not None  # (the random draft may never agree)


@pytest.mark.parametrize("case", ["transformer", "mamba", "hybrid-moe"])
def test_batch_of_one_takes_fewer_passes(case):
    """A draft that mostly agrees: accepted and rejected drafts both happen, the output is the plain
    one, and the target runs fewer forward passes than tokens."""
    model = spec_model(case)
    p = prompts(lengths=(6,))
    want = run(model, p, 20)
    stats = SpecStats()
    assert torch.equal(run(model, p, 20, drafter=ModelDrafter(noisy(model)), draft_tokens=4, stats=stats), want)
    assert 0 < stats.accepted < stats.drafted
    assert stats.forwards < 20 and stats.mean_accepted > 1.0


def test_self_draft_accepts_everything_and_past_the_context():
    """The target as its own draft: every draft accepted, so few target passes; generation runs past
    the context (roll-overs) and stays the plain output."""
    model = spec_model("hybrid")
    want = run(model, prompts(lengths=(4, 7)), 2 * CTX + 5)
    stats = SpecStats()
    got = run(model, prompts(lengths=(4, 7)), 2 * CTX + 5, drafter=ModelDrafter(spec_model("hybrid")), draft_tokens=4, stats=stats)
    assert torch.equal(got, want)
    assert stats.acceptance == 1.0
    assert stats.forwards <= (2 * CTX + 5) // 3


def test_prompt_longer_than_the_context():
    model = spec_model("transformer")
    p = [list(range(V))[: CTX - 1] + list(range(10))]  # CTX + 9 tokens, a repeat inside
    want = run(model, p, 10)
    assert torch.equal(run(model, p, 10, drafter=LookupDrafter(), draft_tokens=4), want)


def test_sampling_with_a_seed_is_reproducible():
    model = spec_model("transformer")
    draft = noisy(model)
    a = run(model, prompts(), 10, temperature=1.0, seed=4, drafter=ModelDrafter(draft))
    b = run(model, prompts(), 10, temperature=1.0, seed=4, drafter=ModelDrafter(draft))
    assert torch.equal(a, b)
    assert not torch.equal(a, run(model, prompts(), 10, temperature=1.0, seed=5, drafter=ModelDrafter(draft)))
