"""Token scores for blend's selection at a check layer: pure tensor functions, no host synchronisation.

A selector is a scorer name plus options, written as one string (`qattn+sink4+cover0.9`), so a row
label and a `--selector` list name every variant:

    k, v       squared L2 drift of the fresh K (or V) from the placed cache (LMCache, CacheBlend)
    qattn      the question's attention: its tokens' fresh q against every computed token's fresh k,
               causal, softmax per head, mass summed over question tokens and heads
    k*qattn    K drift x question attention, each divided by its mean
    +sinkN     always spend budget on the first N tokens of every chunk (attention sinks)
    +gmax      aggregate attention per KV head group and take the max over groups (default: sum)
    +coverX    adaptive budget: keep tokens, best first, until a share X of the question's attention
               mass on chunk tokens is covered; `ratio` is the ceiling
    +floorY    with +cover: never fewer than Y x the ceiling (default 0.25)
    +nofirst   rank the first chunk's tokens last: its placed cache is exact (computed behind the same
               prefix at the same positions), so recomputing it fixes nothing, however much the
               question attends to it (drift scorers already score it ~0)
    +cachedk   (qattn, check layer 1) score the chunk tokens' *cached* K at the check layer, not a recomputed one:
               the layers before it then run for the question (and chunks prefilled in full) alone, and
               the kept tokens catch up once chosen. Layer-0 K/V depend on a token alone, so the cached
               ones are exact and every kept token is computed as without the option; only the ranking
               differs (issue 16: layer 0 over every token is ~4.6 ms of an 8B-shape request)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from blend import question_mass

SCORERS = ("v", "k", "qattn", "k*qattn")
ATTENTION_SCORERS = ("qattn", "k*qattn")
_HELP = "choose one of v, k, qattn, k*qattn, optionally with +sinkN, +gmax, +coverX, +floorY, +nofirst, +cachedk"


@dataclass(frozen=True)
class Selector:
    scorer: str = "k"
    sinks: int = 0  # first tokens of every chunk always kept (within the budget)
    groups: str = "sum"  # how attention combines over KV head groups: "sum" or "max"
    coverage: float = 0.0  # 0: fixed budget of round(ratio x chunk tokens)
    floor: float = 0.25  # adaptive budget's floor, as a share of the ceiling
    skip_first: bool = False  # the first chunk's tokens ranked last (their cache is exact)
    cached_keys: bool = False  # rank on the check layer's cached K: no layer before it over every token

    @property
    def needs_attention(self) -> bool:
        return self.scorer in ATTENTION_SCORERS or self.coverage > 0


def parse_selector(spec: str) -> Selector:
    """`qattn+sink4+gmax+cover0.9` -> Selector; a ValueError naming the bad piece otherwise. Parsed once per
    spec (a request's config is built and read a few times on its host-bound path; a Selector is immutable)."""
    if not isinstance(spec, str):
        raise ValueError(f"unknown selector {spec!r} ({_HELP})")
    return _parse(spec)


@lru_cache(maxsize=256)
def _parse(spec: str) -> Selector:
    scorer, *options = spec.split("+")
    if scorer not in SCORERS:
        raise ValueError(f"unknown selector {spec!r} ({_HELP})")
    fields: dict = {"scorer": scorer}
    for option in options:
        match = re.fullmatch(r"(sink)(\d+)|(gmax)|(cover|floor)(\d*\.?\d+)|(nofirst)|(cachedk)", option)
        if match is None:
            raise ValueError(f"unknown option {option!r} in selector {spec!r} ({_HELP})")
        if match[7]:
            fields["cached_keys"] = True
        elif match[6]:
            fields["skip_first"] = True
        elif match[1]:
            fields["sinks"] = int(match[2])
        elif match[3]:
            fields["groups"] = "max"
        else:
            value = float(match[5])
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{match[4]} {value:g} in selector {spec!r} must be in (0, 1]")
            fields["coverage" if match[4] == "cover" else "floor"] = value
    if fields.get("groups") == "max" and scorer not in ATTENTION_SCORERS:
        raise ValueError(f"+gmax in selector {spec!r} needs an attention scorer (qattn or k*qattn)")
    if fields.get("cached_keys") and scorer != "qattn":
        raise ValueError(f"+cachedk in selector {spec!r} needs the qattn scorer (drift scorers compare a recomputed K)")
    if "floor" in fields and "coverage" not in fields:
        raise ValueError(f"+floor in selector {spec!r} only applies with an adaptive budget (+coverX)")
    return Selector(**fields)


def deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance [T], summed over heads and head dims, between fresh and cached K or V."""
    return (fresh.float() - cached.float()).pow(2).sum(dim=(1, 2))


def question_attention(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, n_question: int,
                       scale: float, groups: str = "sum") -> torch.Tensor:
    """Attention mass [T] the question puts on each computed token at this layer.

    q [T, n_heads, d] and k [T, n_kv_heads, d] are the fresh, rotated q/k of the computed tokens at
    `positions` (sorted); the question is the last `n_question` of them. One matmul of question x
    tokens per KV head group (GQA: the query heads sharing a KV head form its group); causal by
    position; softmax per head and question token; mass summed over question tokens and the heads
    of a group, then summed (or, `groups="max"`, maxed) over groups, so a token that one group needs
    is not outvoted by the others.
    """
    n_kv = k.shape[1]
    share = q.shape[1] // n_kv
    asking = q[-n_question:].float().unflatten(1, (n_kv, share))  # [Q, n_kv, share, d]
    logits = torch.einsum("qhgd,thd->hgqt", asking, k.float()) * scale
    visible = positions[-n_question:, None] >= positions[None, :]
    mass = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).sum(dim=(1, 2))  # [n_kv, T]
    return mass.amax(dim=0) if groups == "max" else mass.sum(dim=0)


def token_scores(selector: Selector, q, k, v, cached: torch.Tensor, positions: torch.Tensor, n_question: int,
                 scale: float, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(score [T], question attention mass [T] or None) for the computed tokens; higher is kept first.

    `cached` is the layer's placed buffer [capacity, 2, n_kv_heads, d]; only the drift scorers
    gather it at `positions`. `kernel`: the question's mass through blend/question_mass.py's Triton
    kernels (the same values up to the order of the sums).
    """
    mass = None
    if selector.needs_attention:
        attention = question_mass.mass if kernel else question_attention
        mass = attention(q, k, positions, n_question, scale, selector.groups)
    if selector.scorer == "qattn":
        return mass, mass
    placed = cached.index_select(0, positions)
    drift = deviation(v, placed[:, 1]) if selector.scorer == "v" else deviation(k, placed[:, 0])
    if selector.scorer == "k*qattn":
        # Dividing by the means leaves the product's ranking unchanged; it keeps the score near 1,
        # so rows of different layers and requests stay on one scale.
        return (drift / drift.mean().clamp_min(1e-30)) * (mass / mass.mean().clamp_min(1e-30)), mass
    return drift, mass


def adaptive_count(score: torch.Tensor, mass: torch.Tensor, candidate: torch.Tensor, coverage: float) -> torch.Tensor:
    """Chunk tokens to keep, best score first, to cover `coverage` of the question's mass on chunk
    tokens (a 0-d device tensor; the caller clamps it to its floor and ceiling)."""
    order = torch.where(candidate, score, torch.full_like(score, float("-inf"))).argsort(descending=True)
    chunk_mass = torch.where(candidate, mass, torch.zeros_like(mass))[order]
    covered = chunk_mass.cumsum(0)
    return (covered < coverage * covered[-1]).sum() + 1
