"""The loading controller: how much to recompute, and which chunks not to load at all.

CacheBlend's point is that loading layer i + 1 hides behind recomputing layer i. So recomputing fewer
tokens than loading takes buys nothing: the request waits for the load anyway. From the measured
bandwidth of each chunk's tier and the measured per-token cost of recompute (blend requests' own, else full
prefill's), pick the ratio whose recompute time matches the load time (never below a quality floor), and prefill a chunk in full
instead of loading it when its load alone would take longer than recomputing it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LoadPlan:
    ratio: float
    recompute_chunks: tuple[int, ...]  # chunk indices prefilled in full instead of loaded
    load_s: float  # estimated load time of the chunks that are loaded
    recompute_s: float  # estimated recompute time at `ratio`
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def plan_loading(chunk_tokens: list[int], chunk_bandwidth: list[float], bytes_per_token: int,
                 prefill_s_per_token: float, n_layers: int, floor: float = 0.15,
                 recompute_s_per_token: float | None = None) -> LoadPlan:
    """`chunk_bandwidth[i]`: bytes/s of the tier chunk i sits in (measured); `prefill_s_per_token`:
    full-prefill seconds per token (measured), of which each layer is an equal share.

    `recompute_s_per_token`: a blend request's compute seconds per token it recomputed, every layer (measured on
    served blend requests), or None. Selective recompute of a few hundred tokens costs more per token than a
    full prefill (smaller matmuls, the per-layer placement and selection; on an H200 blend@0.05 computed for
    ~18 ms where full prefill's rate predicted ~10 ms), so with it the recompute time at a ratio is that rate
    times the tokens recomputed; without it, full prefill's rate with layer 0 over every token."""
    if len(chunk_tokens) != len(chunk_bandwidth):
        raise ValueError(f"{len(chunk_tokens)} chunks but {len(chunk_bandwidth)} bandwidths")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"quality floor {floor} is outside [0, 1]")
    if prefill_s_per_token <= 0 or n_layers < 2:
        raise ValueError(f"prefill cost {prefill_s_per_token} s/token and {n_layers} layers must be positive")
    if recompute_s_per_token is not None and not recompute_s_per_token > 0:
        raise ValueError(f"recompute cost {recompute_s_per_token} s/token must be positive")
    recompute, loaded_tokens, load_s = [], 0, 0.0
    for index, (tokens, bandwidth) in enumerate(zip(chunk_tokens, chunk_bandwidth)):
        chunk_load = tokens * bytes_per_token / bandwidth if bandwidth > 0 else float("inf")
        if chunk_load > tokens * prefill_s_per_token:
            recompute.append(index)
        else:
            loaded_tokens += tokens
            load_s += chunk_load
    if not loaded_tokens:
        return LoadPlan(1.0, tuple(recompute), 0.0, sum(chunk_tokens) * prefill_s_per_token,
                        "every chunk loads slower than it recomputes: full prefill")
    if recompute_s_per_token is not None:  # measured on blend requests: everything per recomputed token
        matched = load_s / (loaded_tokens * recompute_s_per_token)
        ratio = min(1.0, max(floor, matched))
        recompute_s = ratio * loaded_tokens * recompute_s_per_token
    else:  # from full prefill: layer 0 for every token and `ratio` of the tokens in the other layers
        per_layer = prefill_s_per_token / n_layers
        first_layer = loaded_tokens * per_layer
        matched = (load_s - first_layer) / (loaded_tokens * per_layer * (n_layers - 1))
        ratio = min(1.0, max(floor, matched))
        recompute_s = first_layer + ratio * loaded_tokens * per_layer * (n_layers - 1)
    reason = (f"recompute matched to load ({matched:.3f})" if ratio == matched
              else f"quality floor {floor}" if ratio == floor else "load slower than full recompute")
    return LoadPlan(round(ratio, 4), tuple(recompute), load_s, recompute_s, reason)
