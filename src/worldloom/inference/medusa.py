"""Medusa decoding: the heads' guesses as a tree of candidates, verified in one forward pass.

    medusa_ids(model, prompts, sc, stats=None, tree=None, typical=False, epsilon=0.09, delta=0.3,
               autocast_ctx=None) -> Iterator[(B,) LongTensor]

yields the next token of every row, sc.max_new_tokens times, like `decode.generate_ids` (greedy
output token-for-token the plain one). ``model`` has Medusa heads (`worldloom.adapters.medusa`;
a `NoHeadsError` otherwise); ``stats`` a `SpecStats` (``drafted`` counts tree nodes per row,
``accepted`` the tokens they added); ``tree`` the candidate tree as Medusa's "choices" (below;
default `DEFAULT_TREE` cut to the model's heads), checked always but used only where a tree is
verified (attention-only stacks, greedy or typical acceptance; elsewhere the top-1 chain).

**One step.** The last emitted token (the root: the model's own next token) is not yet in the
cache; the heads, read at the hidden state before it, guess the tokens after it. A node of the
tree is a tuple of ranks ``(r1, .., rd)``: the path whose i-th token is head i's r_i-th likeliest
guess, so ``(0,)``, ``(1,)`` are head 1's top two and ``(0, 0)`` head 2's top guess after head 1's.
The root and the N nodes are fed in one pass: each node attends to the cache, the root and its
own ancestors, at the position of its depth (``LWM.forward(tree=(see, pos))``; the N nodes take N
cache slots). Greedy acceptance takes the longest path whose every token is the model's argmax
after its parent (the model's own next token: greedy output unchanged); the model's argmax at
the path's end comes free. The accepted path's keys and values move to contiguous cache slots
(`verify.compact`), the rest is cut, and the heads read the hidden state at the path's end for
the next step. A batch keeps every row at the batch's smallest accepted length (`verify.emit`).

**Sampling.** ``typical=True``: Medusa's typical acceptance: a node stands when the model gives
its token probability above min(epsilon, delta * exp(-entropy)) after its parent (after the
temperature / top-k / top-p filters); the token after the path is sampled from the model. Not
the model's exact distribution, by design (Cai et al. 2024, section 2.3.1). Without it, sampling
verifies the chain of top-1 guesses with speculative sampling (`verify.accept`, a deterministic
drafter): exactly the model's distribution.

**Recurrent layers** (Mamba, Mamba-2, RetNet, linear attention, hybrids): a state reads one
sequence, so they verify the chain of every head's top-1 guess as a linear draft
(`verify.accept`, `verify.rewind`: states restored and the accepted tokens fed again).

**Past the context** the window rolls over exactly where plain decoding's does
(`speculative.CachedModel`); near a roll-over the tree is cut to the nodes that fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..adapters.medusa import head_logits, heads_of
from .sampling import probs, sample
from .speculative import CachedModel, SpecStats
from .verify import accept, compact, emit

# A sparse tree of 26 nodes over 4 heads (the shape of Medusa's default choices: wide near the
# root, where guesses are surest, narrow below). Nodes deeper than a model's heads are dropped.
DEFAULT_TREE = [(0,), (1,), (2,), (3,), (4,), (5,),
                (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
                (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 2), (2, 0, 0),
                (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 0, 2), (0, 0, 2, 0)]


def chain(heads: int) -> list[tuple[int, ...]]:
    """The tree of one path: every head's top guess."""
    return [(0,) * d for d in range(1, heads + 1)]


@dataclass
class Tree:
    """A candidate tree; node 0 is the root, nodes 1..N the choices sorted by depth then ranks
    (so parents come first and any prefix of the nodes is a tree too)."""

    choices: list[tuple[int, ...]]
    parent: torch.Tensor  # (N+1,) each node's parent (the root's: itself)
    depth: torch.Tensor  # (N+1,)
    anc: torch.Tensor  # (N+1, D+1) each node's ancestor at depth 0..D (itself below its own depth)
    see: torch.Tensor  # (N+1, N+1) bool: node i attends to node j (j an ancestor of i, or i itself)

    @classmethod
    def build(cls, choices, heads: int) -> "Tree":
        choices = sorted({_check_choice(c, heads) for c in choices}, key=lambda c: (len(c), c))
        index = {c: i + 1 for i, c in enumerate(choices)}
        missing = next((c for c in choices if len(c) > 1 and c[:-1] not in index), None)
        if missing is not None:
            raise ValueError(f"tree node {missing} lacks its parent {missing[:-1]}")
        n, D = len(choices) + 1, max((len(c) for c in choices), default=0)
        parent = torch.tensor([0] + [index.get(c[:-1], 0) for c in choices])
        depth = torch.tensor([0] + [len(c) for c in choices])
        anc = torch.arange(n)[:, None].repeat(1, D + 1)  # (N+1, D+1)
        for i, c in enumerate(choices, start=1):
            anc[i, : len(c)] = torch.tensor([0] + [index[c[:d]] for d in range(1, len(c))])
        see = torch.zeros(n, n, dtype=torch.bool)
        for d in range(D + 1):
            see[torch.arange(n), anc[:, d]] = True
        return cls(choices, parent, depth, anc, see)

    @property
    def nodes(self) -> int:
        return len(self.choices)

    def to(self, device) -> "Tree":
        return Tree(self.choices, *(t.to(device) for t in (self.parent, self.depth, self.anc, self.see)))

    def prefix(self, n: int) -> "Tree":
        """The tree of the first n nodes."""
        if n >= self.nodes:
            return self
        D = int(self.depth[: n + 1].max())
        return Tree(self.choices[:n], self.parent[: n + 1], self.depth[: n + 1], self.anc[: n + 1, : D + 1],
                    self.see[: n + 1, : n + 1])

    def candidates(self, logits: torch.Tensor) -> torch.Tensor:
        """The heads' logits (K, B, V) -> node tokens (B, N)."""
        if not self.nodes:
            return logits.new_zeros(logits.shape[1], 0, dtype=torch.long)
        width = max(c[-1] for c in self.choices) + 1
        top = logits.topk(width, dim=-1).indices  # (K, B, width)
        head = torch.tensor([len(c) - 1 for c in self.choices], device=logits.device)
        rank = torch.tensor([c[-1] for c in self.choices], device=logits.device)
        return top[head, :, rank].T  # (B, N)

    def inputs(self, fed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(see, pos) of a pass that feeds ``fed`` tokens: fed - N pending ones (causal; the last is
        the root), then the N nodes at their depths after the root."""
        p, dev = fed - self.nodes, self.depth.device
        see = torch.ones(fed, fed, dtype=torch.bool, device=dev).tril()  # (fed, fed)
        see[p - 1 :, p - 1 :] = self.see
        pos = torch.cat([torch.arange(p, device=dev), p - 1 + self.depth[1:]])  # (fed,)
        return see, pos

    def accept(self, logits: torch.Tensor, tokens: torch.Tensor, sc, typical: tuple[float, float] | None,
               gen) -> tuple[torch.Tensor, torch.Tensor]:
        """The deepest node of each row whose path stands, (B,), and the model's token after it, (B,).
        logits (B, N+1, V) at the root and the nodes; tokens (B, N+1) theirs (module doc for the rules)."""
        B = logits.shape[0]
        par = self.parent[1:]
        if typical is None:  # greedy: a node stands when it is the model's argmax after its parent
            ok = tokens[:, 1:] == logits.argmax(-1)[:, par]  # (B, N)
        else:
            p = probs(logits, sc.temperature, top_k=sc.top_k, top_p=sc.top_p)  # (B, N+1, V)
            entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)  # (B, N+1)
            bar = torch.minimum(torch.full_like(entropy, typical[0]), typical[1] * (-entropy).exp())
            ok = p[:, par].gather(-1, tokens[:, 1:, None]).squeeze(-1) > bar[:, par]  # (B, N)
        ok = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=ok.device), ok], 1)  # (B, N+1)
        for _ in range(int(self.depth.max())):  # a node stands only if its whole path does
            ok = ok & ok[:, self.parent]
        best = torch.where(ok, self.depth, -1).argmax(1)  # (B,) the first deepest: the likeliest guesses
        at = logits.gather(1, best[:, None, None].expand(B, 1, logits.shape[-1])).squeeze(1)  # (B, V)
        return best, sample(at, sc.temperature, top_k=sc.top_k, top_p=sc.top_p, generator=gen)


def _check_choice(c, heads: int) -> tuple[int, ...]:
    if not isinstance(c, (tuple, list)) or not c or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in c):
        raise ValueError(f"a tree node is a non-empty tuple of ranks >= 0 (one per head), got {c!r}")
    if len(c) > heads:
        raise ValueError(f"tree node {tuple(c)} is {len(c)} deep, but the model has {heads} Medusa heads")
    return tuple(c)


class _Target:
    """The model as `CachedModel` calls it, with the tree of the next pass and the last output kept."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg
        self.tree: Tree | None = None
        self.out = None

    def new_cache(self, *args):
        return self.model.new_cache(*args)

    def __call__(self, ids, cache):
        tree = self.tree.inputs(ids.shape[1]) if self.tree is not None else None
        self.out = self.model(ids, cache, tree=tree)
        return self.out


@torch.inference_mode()
def medusa_ids(model, prompts: list[list[int]], sc, stats: SpecStats | None = None, tree=None, typical: bool = False,
               epsilon: float = 0.09, delta: float = 0.3, autocast_ctx=None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), sc.max_new_tokens times (module doc)."""
    from ..decode import left_pad

    heads = len(heads_of(model))
    if typical and not (0 < epsilon <= 1 and delta > 0):
        raise ValueError(f"typical acceptance needs 0 < epsilon <= 1 and delta > 0, got {epsilon}, {delta}")
    given = Tree.build(tree, heads) if tree is not None else None  # checked even where a chain is verified
    as_chain = model.backbone.has_recurrent or (sc.temperature > 0 and not typical)
    device = next(model.parameters()).device
    full = (Tree.build(chain(heads), heads) if as_chain else given or Tree.build(
        [c for c in DEFAULT_TREE if len(c) <= heads], heads)).to(device)
    rule = (epsilon, delta) if typical and sc.temperature > 0 else None
    stats = stats if stats is not None else SpecStats()
    gen = torch.Generator().manual_seed(sc.seed) if sc.seed is not None else None
    seq, pad = left_pad(prompts)
    seq, pad = seq.to(device), pad.to(device)
    target = _Target(model)
    cm = CachedModel(target, pad, autocast_ctx)
    h, left = None, sc.max_new_tokens  # h (B, C): the hidden state before the root, where the heads read
    while left > 0:
        L = seq.shape[1]
        fits = 0 if h is None else min(cm.room(L), int((full.depth[1:] <= left - 1).sum()))
        t = full.prefix(fits)
        cand = seq.new_zeros(seq.shape[0], 0)  # (B, N): the heads' guesses after the root
        if t.nodes:
            with cm.amp():
                cand = t.candidates(head_logits(model, h))
        target.tree = t if t.nodes and not as_chain else None
        logits = cm.feed(seq, cand)[:, -(t.nodes + 1):]  # (B, N+1, V) at the root and the nodes
        hidden = target.out.hidden[:, -(t.nodes + 1):]
        stats.forwards += 1
        tokens = torch.cat([seq[:, -1:], cand], 1)  # (B, N+1)
        if as_chain and rule is None:  # the chain: greedy, or speculative sampling (exact)
            full_len = torch.full_like(pad, t.nodes)
            best, fix = accept(logits, cand, full_len, sc.temperature, top_k=sc.top_k, top_p=sc.top_p, generator=gen)
        else:
            best, fix = t.accept(logits, tokens, sc, rule, gen)
        n = t.depth[best]  # (B,) accepted tokens of each row
        out = emit(tokens.gather(1, t.anc[best][:, 1:]), n, fix)  # (B, m+1)
        m = out.shape[1] - 1
        _keep(cm, t, best, m, L, compact_tree=target.tree is not None)
        at = t.anc[best, m]  # (B,) each row's node at depth m: the hidden state before the next root
        h = hidden.gather(1, at[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
        if t.nodes:
            stats.verifications += 1
            stats.drafted += t.nodes * seq.shape[0]
            stats.accepted += int(n.sum())
            stats.emitted += m + 1
        seq = torch.cat([seq, out], 1)
        for tok in out[:, :left].unbind(1):
            yield tok
        stats.tokens += min(left, out.shape[1])
        left -= out.shape[1]


def _keep(cm: CachedModel, t: Tree, best: torch.Tensor, m: int, L: int, compact_tree: bool) -> None:
    """Make the cache hold the sequence's first L + m tokens: the path's first m nodes (their slots
    moved together after the root's) for a tree, a rewind for a chain (none when nothing was refused:
    a recurrent state that saw only accepted tokens stays)."""
    if not compact_tree:
        if cm.offset + cm.cache.length != L + m:
            cm.rewind(L + m)
        return
    root = cm.cache.length - t.nodes - 1  # the root's slot; node i sits at root + i
    compact(cm.cache, root + 1, root + t.anc[best][:, 1 : m + 1])
