"""The per-layer step of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2), positions explicit.

Full prefill, decode, full KV reuse and selective recompute are all this one step, run on different
sets of positions: it takes the hidden states of the tokens being computed and their absolute
positions, writes their K/V into the cache at those positions and attends to the cache with a
causal mask built from positions. The weights are the Hugging Face modules' own; nothing is copied.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from blend import fused, pool_attention, question_mass, rerotate, scattered, skinny
from blend.cache import KVCache, KVPool
from blend.selectors import question_attention

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Rope types whose inverse frequencies do not depend on the sequence length and whose cos/sin are not
# rescaled: for those, rotating by p then by d is exactly rotating by p + d, which re-placement needs.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(ValueError):
    """The model uses a setting the per-layer step does not implement; it must not be served."""


def rope_settings(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope_type = rope_settings(config).get("rope_type", rope_settings(config).get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModel(
            f"rope scaling {rope_type!r} is not implemented by the per-layer step "
            f"(supported: {', '.join(STATIC_ROPE_TYPES)})"
        )
    partial = getattr(config, "partial_rotary_factor", None) or rope_settings(config).get(
        "partial_rotary_factor"
    )
    if partial not in (None, 1, 1.0):
        raise UnsupportedModel(f"partial_rotary_factor={partial} is not implemented (only full rotary)")
    if getattr(config, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        raise UnsupportedModel(
            f"sliding_window={getattr(config, 'sliding_window', None)} attention is not implemented"
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def causal_mask(positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Exact causal mask from absolute positions: a query at position p sees keys at positions <= p,
    whatever else the cache holds. Additive (0 / -inf), which CPU SDPA runs about 2x faster than a
    boolean mask of the same shape."""
    keys = torch.arange(length, device=positions.device)
    allowed = positions[:, None] >= keys[None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill_(~allowed, float("-inf"))[None, None]


# On CUDA, PyTorch's SDPA takes cuDNN attention, which builds an execution plan for every new shape
# (40-66 ms on an H200, torch 2.11; services/bench/probe_sdpa.py) and then runs that shape in ~0.2 ms.
# Served prompts differ in length and blend's recompute set in size, so unpadded, nearly every request
# paid plan builds. Attention is padded to these multiples instead (queries, keys), so shapes repeat.
CUDA_ATTENTION_BUCKETS = (64, 512)
# `LlamaStep.warm_attention` warms the padded lengths up to this many tokens (64 lengths, two layouts each: a few
# seconds of start-up on an H200); a longer prompt's first request of its length pays that length's plan.
WARM_ATTENTION_TOKENS = 32768


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def fused_projection(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of several projections of one input as one matrix (q, k, v; gate, up): one matmul
    instead of several. The modules' own parameters are re-pointed to views of it, so it costs no memory
    and the Hugging Face forward still runs; kept on the first module, rebuilt if a module's weight no
    longer lies where it put it (the model was moved or reloaded)."""
    owner = linears[0]
    fused = getattr(owner, "_kvblend_fused", None)
    if fused is not None:
        weight, bias, starts = fused
        if all(m.weight.data_ptr() == start for m, start in zip(linears, starts)):
            return weight, bias
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in and out of inference mode
        weight = torch.cat([m.weight for m in linears])
        with_bias = all(m.bias is not None for m in linears)
        bias = torch.cat([m.bias for m in linears]) if with_bias else None
        row = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight = torch.nn.Parameter(weight[row : row + rows], requires_grad=False)
            if with_bias:
                m.bias = torch.nn.Parameter(bias[row : row + rows], requires_grad=False)
            row += rows
    owner._kvblend_fused = (weight, bias, [m.weight.data_ptr() for m in linears])
    return weight, bias


# Steps over at most this many tokens may project through the few-rows matmul (blend/skinny.py): the row
# counts `services.bench.probe_skinny` timed it at (1 and 16: decode batches).
SKINNY_ROWS = 16
# Steps over at most this many tokens may rotate q/k by `LlamaStep.rotation`'s matrices (d x d each).
ROTATION_MATRIX_ROWS = 32


def _plus_linear(h: torch.Tensor, x: torch.Tensor, linear) -> torch.Tensor:
    """h + linear(x) as one GEMM that accumulates into h (the residual add in the matmul's epilogue, not a
    pass of its own over [T, hidden]); rounded once instead of twice. Linears with a bias: two steps."""
    if linear.bias is not None or h.dim() != 2:
        return h + linear(x)
    return torch.addmm(h, x, linear.weight.t())


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class DecodeBatch:
    """One batched decode step's attention over every request at once: each layer, the requests' K/V
    (new token included) are copied into one zero-padded buffer [rows, keys, 2, kv_heads, d] by one
    multi-tensor copy, and one attention call runs over it under a mask that hides each row's keys past
    its request's end. Rows pad to a power of two and keys to the key bucket (on CUDA), so attention
    shapes repeat (see CUDA_ATTENTION_BUCKETS); padded rows see key 0 only. Built once per step, shared
    by its layers: a layer rewrites each row's filled keys, and the padding stays zero."""

    keys_values: torch.Tensor  # [rows, keys, 2, n_kv_heads, head_dim]
    mask: torch.Tensor  # [rows, 1, 1, keys] additive

    @classmethod
    def build(cls, step: "LlamaStep", ends: list[int], positions: torch.Tensor) -> "DecodeBatch":
        """`ends` the positions on the host (shapes), `positions` the same on the device (the mask is
        built there: a host-to-device copy here would wait for the GPU once per step)."""
        rows, width = len(ends), max(ends) + 1
        if step.attention_buckets:
            rows, width = _pow2(rows), round_up(width, step.attention_buckets[1])
        device = step.device
        data = torch.zeros(rows, width, 2, step.n_kv_heads, step.head_dim, dtype=step.dtype, device=device)
        last = F.pad(positions.to(device), (0, rows - len(ends)))  # padding rows see key 0 only
        visible = torch.arange(width, device=device)[None, :] <= last[:, None]
        mask = torch.zeros(rows, width, dtype=step.dtype, device=device).masked_fill_(~visible, float("-inf"))
        return cls(data, mask[:, None, None, :])

    def attend(self, step: "LlamaStep", layer: int, q, kv, caches: list[KVCache], ends: list[int]) -> torch.Tensor:
        """Write each request's new K/V (kv [B, 2, kv_heads, d]) at its end, gather every request's
        keys 0..end, attend; q may carry padding rows (a graph bucket's). Returns [B, heads x d]."""
        n = len(caches)
        torch._foreach_copy_([cache.data[layer, end] for cache, end in zip(caches, ends)], list(kv[:n].unbind(0)))
        torch._foreach_copy_([self.keys_values[i, : end + 1] for i, end in enumerate(ends)],
                             [cache.data[layer, : end + 1] for cache, end in zip(caches, ends)])
        rows = self.keys_values.shape[0]
        q = q[:rows]
        if q.shape[0] < rows:
            q = F.pad(q, (0, 0, 0, 0, 0, rows - q.shape[0]))
        keys = self.keys_values[:, :, 0].transpose(1, 2)  # [rows, n_kv, keys, d]
        values = self.keys_values[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=self.mask, scale=step.scale,
                                             enable_gqa=True)  # [rows, heads, 1, d]
        return out[:n, :, 0].reshape(n, step.n_heads * step.head_dim)


@dataclass
class PooledDecode:
    """One batched decode step's attention when every request's cache is a range of one `KVPool`
    (issue 18): each layer, one multi-row write of the new K/V into the pool and one varlen attention
    call over it, each row with its own request's offset and length (no gather, no mask). Built from
    one int64 tensor `raw` = [tokens | positions | pool rows written | offsets (rows + 1) | keys seen]
    of `rows` rows, so a CUDA graph captured over a fixed `raw` (blend.graphs.DecodeGraphs) serves
    every batch of that size: rows past the batch write and attend at the pool's scratch position 0.

    With `splits` > 1 each row's keys are cut into that many equal pieces attended as separate varlen
    entries and merged by their log-sum-exps (split-KV, as flash-decoding does): one request's 32 heads
    alone give the kernel 32 blocks for 132 SMs, each walking the whole context. All of it is device
    arithmetic on `raw`, so the graph still serves every batch. On CUDA the attention is the pool-attention
    Triton kernel (`pool_attention_kernel`, one piece: it splits the keys itself) or FlashAttention's varlen
    kernel; elsewhere `_varlen` computes the same (the reference, what CPU tests run)."""

    pool: KVPool
    raw: torch.Tensor
    rows: int
    tokens: torch.Tensor  # [rows] long
    positions: torch.Tensor  # [rows] long
    slots: torch.Tensor  # [rows] long: the pool row each token's K/V goes to (offset + position)
    starts: torch.Tensor  # [entries + 1] int32 offsets of the varlen entries (cu_seqlens_k; last: pool size)
    used: torch.Tensor  # [entries] int32: keys each entry sees (at least 1)
    queries: torch.Tensor  # [entries + 1] int32: 0, 1, ..., entries (one query each: cu_seqlens_q)
    splits: int = 1
    valid: torch.Tensor | None = None  # [rows, splits] bool: the piece holds keys (else its weight is 0)

    @staticmethod
    def layout(caches: list[KVCache], tokens: list[int], ends: list[int], rows: int, pool: KVPool) -> torch.Tensor:
        """The host `raw` of a batch (rows past len(caches) are scratch padding)."""
        pad = rows - len(caches)
        offsets = [cache.offset for cache in caches] + [0] * pad
        positions = list(ends) + [0] * pad
        return torch.tensor(list(tokens) + [0] * pad + positions + [o + p for o, p in zip(offsets, positions)]
                            + offsets + [pool.tokens] + [p + 1 for p in positions], dtype=torch.long)

    @classmethod
    def over(cls, pool: KVPool, raw: torch.Tensor, rows: int, splits: int = 1) -> "PooledDecode":
        starts, end, used = raw[3 * rows : 4 * rows], raw[4 * rows : 4 * rows + 1], raw[4 * rows + 1 : 5 * rows + 1]
        valid = None
        if splits > 1:
            if splits > pool.block:
                raise ValueError(f"{splits} splits exceed the pool's block of {pool.block} positions")
            piece = (used + splits - 1) // splits  # [rows]
            begin = torch.arange(splits, device=raw.device)[None, :] * piece[:, None]  # [rows, splits]
            left = used[:, None] - begin
            valid = left > 0
            # An empty piece still reads one key (inside the request's range: it is at least a block
            # long, and splits <= block); its weight is zeroed at the merge.
            used = torch.minimum(left, piece[:, None]).clamp_(min=1).flatten()
            starts = (starts[:, None] + begin).flatten()
        entries = used.shape[0]
        return cls(pool, raw, rows, raw[:rows], raw[rows : 2 * rows], raw[2 * rows : 3 * rows],
                   torch.cat((starts, end)).to(torch.int32), used.to(torch.int32),
                   torch.arange(entries + 1, device=raw.device, dtype=torch.int32), splits, valid)

    @classmethod
    def build(cls, caches: list[KVCache], tokens: list[int], ends: list[int], device,
              splits: int = 1) -> "PooledDecode":
        pool = caches[0].pool
        return cls.over(pool, cls.layout(caches, tokens, ends, len(caches), pool).to(device), len(caches), splits)

    def attend(self, step: "LlamaStep", layer: int, q, kv) -> torch.Tensor:
        """Write each row's new K/V (kv [rows, 2, kv_heads, d]; None: already written at `slots`) into the
        pool, attend; -> [rows, heads x d]."""
        rows = self.pool.layer_rows(layer)
        if kv is not None:
            rows.index_copy_(0, self.slots, kv.to(rows.dtype))
        keys, values = rows[:, 0], rows[:, 1]  # [pool tokens, kv_heads, d], strided views
        if step.pool_attention_kernel and self.splits == 1:
            # One program per KV head and piece of a row's keys (blend/pool_attention.py): each key read once for
            # the heads sharing it. H200, 1 row of 5,184 keys: 11.4 us against FlashAttention's 19.5 a layer (s13a).
            pieces = pool_attention.pieces_for(self.rows, step.n_kv_heads, self.pool.longest)
            workspace = (pool_attention.workspace_for(pieces, self.rows, step.n_heads, step.head_dim, q.device)
                         if pieces > 1 else None)  # its own: a graph recording this keeps the address
            out = pool_attention.decode(q, keys, values, self.starts[: self.rows], self.used, step.scale, pieces,
                                        self.pool.longest, workspace=workspace)
            return out.reshape(self.rows, step.n_heads * step.head_dim)
        if self.splits > 1:
            q = q.repeat_interleave(self.splits, dim=0)
        if q.is_cuda:
            out, lse = torch.ops.aten._flash_attention_forward(
                q, keys, values, self.queries, self.starts,
                1, self.pool.longest, 0.0, False, False, scale=step.scale, seqused_k=self.used)[:2]
            # varlen log-sum-exps come as [heads, entries] (or, in older builds, [entries, heads, 1])
            lse = lse.t() if lse.dim() == 2 else lse[..., 0]
        else:
            out, lse = _varlen(q, keys, values, self.starts, self.used, step.scale)
        if self.splits > 1:
            out = _merge(out.view(self.rows, self.splits, *out.shape[1:]),
                         lse.reshape(self.rows, self.splits, -1), self.valid)
        return out.reshape(self.rows, step.n_heads * step.head_dim)


def _varlen(q, keys, values, starts, used, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """What the varlen kernel computes, one entry at a time (CPU): q [E, heads, d], entry e attending to
    keys[starts[e] : starts[e] + used[e]] (grouped heads shared) -> (out [E, heads, d], lse [E, heads])."""
    group = q.shape[1] // keys.shape[1]
    outs, lses = [], []
    for e, (start, count) in enumerate(zip(starts.tolist(), used.tolist())):
        k = keys[start : start + count].float().repeat_interleave(group, 1)  # [count, heads, d]
        v = values[start : start + count].float().repeat_interleave(group, 1)
        scores = torch.einsum("hd,khd->hk", q[e].float(), k) * scale
        outs.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
        lses.append(scores.logsumexp(-1))
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


def _merge(out: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Split-KV pieces [rows, splits, heads, d] and their log-sum-exps [rows, splits, heads] -> [rows,
    heads, d]: each piece weighted by its share of the row's softmax mass (empty pieces: none)."""
    lse = torch.where(valid[..., None], lse.float(), float("-inf"))
    weight = torch.exp(lse - lse.amax(1, keepdim=True))  # the first piece is never empty: max finite
    merged = (out.float() * weight[..., None]).sum(1) / weight.sum(1)[..., None]
    return merged.to(out.dtype)


@dataclass(frozen=True)
class SuffixCausal:
    """`LlamaStep.mask`'s answer for queries at the contiguous positions start..length-1 when they are
    most of the keys: attention runs as plain causal over all `length` keys with `start` zero query rows
    in front (computed, then dropped), which takes the fused causal kernel instead of a dense mask
    over nearly the same area. Exact: the row at position p sees keys 0..p either way."""

    start: int


class ScatteredCausal(NamedTuple):
    """`mask`'s answer for queries at sorted scattered positions where the scattered-attention kernel
    runs: their positions (int32), each query seeing the keys up to its own position."""
    positions: torch.Tensor


class LlamaStep:
    """Explicit-position view of a loaded Hugging Face Llama-family causal LM (batch of one request)."""

    def __init__(self, hf_model):
        check_supported(hf_model.config)
        config = hf_model.config
        self.hf = hf_model
        self.config = config
        self.layers = hf_model.model.layers
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        rotary = hf_model.model.rotary_emb
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise UnsupportedModel(f"rope attention_scaling={rotary.attention_scaling} is not implemented")
        self.inv_freq = rotary.inv_freq.float()
        self._inv_freq_here: torch.Tensor | None = None  # inv_freq on the keys' device (`turn_keys`)
        self.scale = self.layers[0].self_attn.scaling
        self.max_positions = getattr(config, "max_position_embeddings", None)
        # `cos_sin` of every position of the context, computed once (CUDA; see `cos_sin`).
        self._rope_table = self._cos_sin_table() if self.device.type == "cuda" else None
        # (query, key) multiples attention is padded to, or None for exact shapes; None on CPU, where
        # no per-shape plan exists and padding would only add work (tests may set it there).
        self.attention_buckets: tuple[int, int] | None = (
            CUDA_ATTENTION_BUCKETS if self.device.type == "cuda" else None)
        # Batched decode attends all requests in one call over a zero-padded copy of their K/V (one
        # gather per layer) instead of one call per request: on CUDA the per-request calls made a
        # 16-request step launch-bound (~60 ms); on CPU per-request calls are cheaper (tests may set it).
        self.batched_attention = self.device.type == "cuda"
        # Steps over at most this many tokens project q/k/v and gate/up with one matmul each (fewer
        # launches); larger ones with one per projection. None: every step with the fused kernels, which read
        # the strided slices at full speed (H200, session 11: full prefill 132.4 against 137.2 ms projected
        # apart, same rounds), else up to 1,024 tokens (PyTorch's strided SiLU/mul/RoPE passes cost a full
        # prefill ~7 ms over the HF forward). Tests and the bench may set a number.
        self.fuse_projections_up_to: int | None = None
        # Pieces each row's keys are cut into in a decode step over the KV pool (PooledDecode): more
        # parallel work for one request's attention on a GPU; 1 elsewhere (tests may set it).
        self.decode_splits = 1  # split-KV (8 pieces) measured slower on the H200: 7.51 against 6.25 ms/token
        # Queries at scattered positions (blend's recompute set, reuse's question) attend through the
        # Triton kernel that takes their positions (blend/scattered.py: only the keys each block of
        # queries can see, no dense mask); SDPA with the dense mask where there is no Triton or no GPU.
        self.scattered_attention = self.device.type == "cuda" and scattered.available(self.device)
        # A decode step over the KV pool attends through the Triton kernel that reads each key once for the heads
        # sharing it (blend/pool_attention.py), FlashAttention's varlen kernel elsewhere.
        self.pool_attention_kernel = self.scattered_attention
        # Steps over at most SKINNY_ROWS tokens (decode batches) project through the Triton matmul for few rows
        # (blend/skinny.py: each weight streamed once, the residual added in its epilogue) where `skinny.FASTER`
        # says it beat cuBLAS on the H200; cuBLAS elsewhere (tests may set it).
        self.skinny_kernel = self.scattered_attention
        # Placed chunks' keys re-rotate in one Triton kernel (blend/rerotate.py) instead of five passes.
        self.rerotate_kernel = self.scattered_attention
        # The question's attention mass (the served selector's ranking) in two Triton kernels
        # (blend/question_mass.py) instead of a dozen PyTorch operations in the request's host-bound head.
        self.question_kernel = self.scattered_attention
        # RoPE with the K/V write, and SiLU x up, as one Triton kernel each (blend/fused.py) instead of
        # PyTorch's passes over strided slices (SiLU models only: the MLP kernel computes SiLU).
        self.fused_kernels = self.scattered_attention and getattr(config, "hidden_act", "silu") == "silu"
        for block in self.layers:  # one matmul for q/k/v and one for gate/up from now on (no extra memory)
            fused_projection([block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj])
            fused_projection([block.mlp.gate_proj, block.mlp.up_proj])
        # blend.graphs.LayerGraphs, or None: the row-wise parts of a step over few enough tokens replay as
        # CUDA graphs (set at the edge, e.g. by the engine on CUDA; eager is the reference).
        self.graphs = None
        # blend.cache.KVPool, or None: request caches are ranges of it where one fits (set at the edge).
        self.kv_pool: KVPool | None = None
        # blend.graphs.DecodeGraphs, or None: a decode step over pooled caches replays as one CUDA graph.
        self.decode_graphs = None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's K and V take in the cache, every layer."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hf.model.embed_tokens.weight.device

    def cache_tokens(self, capacity: int) -> int:
        """Positions a KV buffer asked to hold `capacity` tokens has: padded to the key bucket, so
        attention over it keeps a repeating shape (see CUDA_ATTENTION_BUCKETS)."""
        return round_up(capacity, self.attention_buckets[1]) if self.attention_buckets else capacity

    @property
    def longest_cache(self) -> int | None:
        """The most positions a request's KV buffer holds: the model's context, padded (None: unbounded).
        A KV pool's `longest` (its decode attention's bound on keys per row)."""
        return self.cache_tokens(self.max_positions) if self.max_positions else None

    def new_cache(self, capacity: int) -> KVCache:
        """A range of the KV pool where one is set and has room, else a buffer of its own."""
        if self.kv_pool is not None:
            cache = self.kv_pool.take(self.cache_tokens(capacity))
            if cache is not None:
                return cache
        return KVCache.empty(self.n_layers, self.cache_tokens(capacity), self.n_kv_heads, self.head_dim,
                             self.dtype, self.device)

    # --- RoPE -------------------------------------------------------------------------------------

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotation angles [T, head_dim / 2], rounded to float32 exactly as the Hugging Face forward does."""
        return positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) of shape [T, 1, head_dim] at absolute positions, for the forward's own q/k
        rotation (`rotate_by`): in the model's dtype, rounded from float32 as the Hugging Face forward
        rounds them (so a bf16 model rotates in bf16, as HF does, in a third of the float32 passes'
        memory traffic); the sine's first half negated once here, not per layer (`signed_sin`).
        On CUDA two lookups in a table of the whole context computed the same way at start-up (the same
        bits: each entry is the same elementwise arithmetic): ~12 small kernels fewer each time, which a
        whole-layer graph paid on every layer. Positions are below the context (longer prompts are refused)."""
        if self._rope_table is not None:
            cos, signed_sin = self._rope_table
            return cos[positions], signed_sin[positions]
        return self._cos_sin_at(positions)

    def _cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(self.angles(positions))
        return cos.to(self.dtype), self.signed_sin(sin.to(self.dtype))

    def _cos_sin_table(self):
        """(cos, signed sin) [context, 1, head_dim] for every position, or None where the context is unknown
        or too long to hold (over 256K positions: 128 MB at head_dim 128 in bf16)."""
        if not self.max_positions or self.max_positions > 262144:
            return None
        return self._cos_sin_at(torch.arange(self.max_positions, device=self.device))

    @staticmethod
    def _cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]
        return emb.cos().float(), emb.sin().float()

    @staticmethod
    def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by float32 cos/sin, rounded once (re-placing cached K, where float32 angle
        differences keep it exact)."""
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    @staticmethod
    def rotate_by(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x rotated by `cos_sin`'s pair, in x's dtype: x * cos + rotate_half(x) * sin as the Hugging Face
        forward computes it, in 3 kernels instead of 5 (rotate_half(x) * sin == x.roll(half) * signed
        sin; the product and the sum rounded once)."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """`cos_sin`'s rotation as one [head_dim, head_dim] matrix per position ([T, d, d], model dtype):
        x @ R[t] == `rotate_by(x, cos, signed_sin)` for every head of token t, each output the sum of two
        products rounded once. A decode step's q and k then rotate in one batched matmul per layer, not
        three elementwise kernels (for few tokens only: the matrices are d x d per token)."""
        cos, signed_sin = self.cos_sin(positions)  # [T, 1, d]
        d = cos.shape[-1]
        shift = torch.arange(d, device=cos.device)
        # out[j] = x[j] cos[j] + x[(j - d/2) mod d] signed_sin[j]: a diagonal plus a rolled one.
        matrix = torch.diag_embed(cos[:, 0])
        matrix[:, (shift - d // 2) % d, shift] = signed_sin[:, 0]
        return matrix

    def _rotate(self, x: torch.Tensor, rope) -> torch.Tensor:
        """x [T, heads, d] rotated by `rope`: `rotation`'s matrices (one matmul) or `cos_sin`'s pair."""
        return torch.bmm(x, rope) if isinstance(rope, torch.Tensor) else self.rotate_by(x, *rope)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply RoPE to x [T, heads, head_dim] at the given positions."""
        return self.rotate_by(x, *self.cos_sin(positions))

    def rerotate(self, k: torch.Tensor, start: int, delta: int) -> torch.Tensor:
        """Move keys [T, heads, head_dim] rotated at positions start.. to start + delta..

        Rotations compose, but the forward rounds each angle to float32; rotating by the difference
        of the two rounded angles (taken in float64) lands exactly on the K the forward computes at
        the new position, where rotating by delta's own angle would be off by the rounding.
        """
        if delta == 0:
            return k
        return self.apply_rotation(k, *self.turn(start, delta, k.shape[0]))

    def turn(self, start: int, delta: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin that re-rotate `count` keys from positions start.. to start + delta.. (see rerotate)."""
        positions = torch.arange(start, start + count, device=self.device)
        return self.turn_between(positions, positions + delta)

    def turn_between(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin that move keys rotated at positions `old` to positions `new`, token by token."""
        return self.turn_pair(torch.stack((old, new)))

    def turn_pair(self, old_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`turn_between` of old_new [2, T] (old positions, then new): both rows' angles in one pass (the
        same values, fewer small launches in a request's set-up)."""
        angles = self.angles(old_new.flatten()).double().unflatten(0, old_new.shape)
        return self._cos_sin(angles[1] - angles[0])

    @staticmethod
    def signed_sin(sin: torch.Tensor) -> torch.Tensor:
        """sin with its first half negated: rotate_half(x) * sin == x.roll(half) * signed_sin(sin)."""
        half = sin.shape[-1] // 2
        return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def warm_attention(self, longest: int | None = None) -> int:
        """Run plain causal attention once at every padded length a served prompt's attention can take (the key
        bucket's multiples up to `longest`, default `longest_cache`), on keys laid out as in a KV buffer, so no
        request pays a per-shape plan (cuDNN's SDPA builds one per new shape, 40-66 ms on an H200: the comment at
        CUDA_ATTENTION_BUCKETS). Full and prefix prefill and blend's layers before the check run plain causal
        attention past the largest layer-graph bucket; a bench's one prompt warms one shape, a server's prompts
        many. Start-up; returns how many shapes ran."""
        if not self.attention_buckets:  # (None on the CPU, where attention builds no plans)
            return 0
        longest = min(longest or self.longest_cache or 0, WARM_ATTENTION_TOKENS)
        if not longest:
            return 0
        block = self.attention_buckets[1]
        widths = range(block, round_up(longest, block) + 1, block)
        buffer = torch.zeros(widths[-1], 2, self.n_kv_heads, self.head_dim, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            for width in widths:
                # q as the step makes it: its own tensor (the fused RoPE kernel's output, a graph's buffer, padding),
                # or the query heads of the unfused projection's rotated q and k, a view (a plan is per stride too).
                qk = torch.zeros(width, self.n_heads + self.n_kv_heads, self.head_dim, dtype=self.dtype,
                                 device=self.device)
                for q in (qk[:, : self.n_heads].contiguous(), qk[:, : self.n_heads]):
                    self.attention(q, buffer[:width, 0].transpose(0, 1), buffer[:width, 1].transpose(0, 1), None,
                                   True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return len(widths)

    def compile_kernels(self) -> float:
        """Compile the Triton kernels this step launches (start-up: the server, the bench); seconds. A kernel
        that does not compile for this card or model shape is turned off with a warning naming the error,
        and the step takes PyTorch's path for it (SDPA with the dense mask, the re-rotation's passes): slower,
        the same answers, and a server that starts."""
        started, attempted = time.perf_counter(), False
        for flag, compile_one in (
                ("scattered_attention", lambda: scattered.compile_variants(
                    self.n_heads, self.n_kv_heads, self.head_dim, self.dtype, self.device)),
                ("pool_attention_kernel", lambda: pool_attention.compile_variants(
                    self.n_heads, self.n_kv_heads, self.head_dim, self.dtype, self.device, self.longest_cache or 8192)),
                ("skinny_kernel", lambda: skinny.compile_variants(self._skinny_shapes(), self.dtype, self.device)),
                ("question_kernel", lambda: question_mass.compile_variants(
                    self.n_heads, self.n_kv_heads, self.head_dim, self.dtype, self.device, question_attention)),
                ("rerotate_kernel", lambda: rerotate.compile_variants(
                    self.n_kv_heads, self.head_dim, self.dtype, self.device, self.inv_freq, self.turn_tables)),
                ("fused_kernels", lambda: fused.compile_variants(
                    self.n_heads, self.n_kv_heads, self.head_dim, self.config.intermediate_size, self.dtype,
                    self.device, self.config.hidden_size))):
            if not getattr(self, flag):
                continue
            attempted = True
            try:
                compile_one()
            except Exception as err:  # noqa: BLE001 - any compile or launch failure: fall back, never fail start-up
                setattr(self, flag, False)
                log.warning("Triton kernel for %s does not run here (%s: %s); PyTorch's path serves it instead",
                            flag, type(err).__name__, err)
        if attempted and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started if attempted else 0.0

    def turning(self, old_new: torch.Tensor):
        """What `turn_keys` re-rotates placed keys by, token by token, from old_new [2, T] (positions when
        computed, then now; on the device), made once per request: through the Triton kernel the positions
        themselves (it computes each token's angles, `rerotate.turn_at`), else `turn_pair`'s float32 cos and
        signed sin."""
        return old_new if self.rerotate_kernel else self.turn_tables(old_new)

    def turn_tables(self, old_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`turn_pair`'s float32 cos and its signed sin (`signed_sin`) for old_new [2, T]."""
        cos, sin = self.turn_pair(old_new)
        return cos, self.signed_sin(sin)

    def turn_keys(self, keys: torch.Tensor, turning) -> None:
        """`turn_in_place` by `turning` (`turning`'s: positions for the Triton kernel, `rerotate.turn_at`, where it
        runs; else the cos and signed sin tables)."""
        if isinstance(turning, torch.Tensor):
            if self._inv_freq_here is None or self._inv_freq_here.device != keys.device:
                self._inv_freq_here = self.inv_freq.to(keys.device).contiguous()
            rerotate.turn_at(keys, turning, self._inv_freq_here)
        else:
            self.turn_in_place(keys, *turning)

    @staticmethod
    def turn_in_place(keys: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """Re-rotate keys (a view into a KV buffer) in place by float32 cos/sin (`signed_sin` from
        `signed_sin`), rounded once: `apply_rotation` in 5 kernels instead of 8 (it runs every layer of
        every request that places cached chunks)."""
        xf = keys.float()
        keys.copy_(torch.addcmul(xf * cos, xf.roll(xf.shape[-1] // 2, dims=-1), signed_sin))

    # --- the step ---------------------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.model.embed_tokens(token_ids.to(self.device))

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor, rope=None):
        """Rotated q [T, n_heads, d], rotated k and v [T, n_kv_heads, d] for hidden states h [T, hidden].

        `rope` (`cos_sin`'s pair, or `rotation`'s matrices for a small step) may be passed in when the
        same positions run through several layers."""
        n = h.shape[0]
        if rope is None and self._graphed(n):
            # The layer graphs' `pre` (norm, projections, RoPE; the rotation from positions inside): one replay
            # instead of ~7 launches and the cos/sin lookups (the check layer's q/k/v, in the request's head).
            # Views of the bucket's buffers, valid until its next use.
            _, q, kv = self.graphs.pre(layer, h, positions)
            return q[:n], kv[:, 0], kv[:, 1]
        rope = rope if rope is not None else self.cos_sin(positions)
        if self._rope_kernel(rope):
            q = torch.empty(n, self.n_heads, self.head_dim, dtype=h.dtype, device=h.device)
            kv = torch.empty(n, 2, self.n_kv_heads, self.head_dim, dtype=h.dtype, device=h.device)
            fused.rope_qkv(*self._projected(layer, h), *rope, q, kv)
            return q, kv[:, 0], kv[:, 1]
        q, k, v = self._projected(layer, h)
        if self._apart(n):  # separate, contiguous outputs (see `_projected`): rotated apart
            return self._rotate(q, rope), self._rotate(k, rope), v
        # q and k are adjacent in the fused projection's output, so they rotate in one pass (q's view widened).
        qk = self._rotate(q.as_strided((n, self.n_heads + self.n_kv_heads, self.head_dim), q.stride()), rope)
        return qk[:, : self.n_heads], qk[:, self.n_heads :], v

    def qkv_into(self, layer: int, h: torch.Tensor, positions: torch.Tensor, rope, q_out: torch.Tensor,
                 kv_out: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """`qkv` written out: rotated q into q_out [>= T, n_heads, d], K and V into rows `slots` (None: 0..T-1) of
        kv_out [N, 2, n_kv_heads, d] (a layer of a KV buffer: the cache write). One pass through the fused kernel
        on CUDA (`fused_kernels`), `qkv` and copies elsewhere."""
        n = h.shape[0]
        rope = rope if rope is not None else self.cos_sin(positions)
        if self._rope_kernel(rope):
            if slots is not None and slots.dtype != torch.int64:
                slots = slots.long()
            fused.rope_qkv(*self._projected(layer, h), *rope, q_out, kv_out, slots)
            return
        q, k, v = self.qkv(layer, h, positions, rope)
        q_out[:n].copy_(q)
        kv = torch.stack((k, v), dim=1).to(kv_out.dtype)
        if slots is None:
            kv_out[:n].copy_(kv)
        else:
            kv_out.index_copy_(0, slots, kv)

    def _apart(self, n: int) -> bool:
        """Does a step over n tokens project q, k, v (and gate, up) with one matmul each (`fuse_projections_up_to`)?"""
        limit = self.fuse_projections_up_to
        if limit is None:
            return not self.fused_kernels and n > 1024
        return n > limit

    def _rope_kernel(self, rope) -> bool:
        return self.fused_kernels and not isinstance(rope, torch.Tensor)

    def _projected(self, layer: int, h: torch.Tensor):
        """q [T, n_heads, d], k and v [T, n_kv_heads, d] before RoPE: column slices of one fused matmul (few
        tokens), else one matmul each."""
        attn = self.layers[layer].self_attn
        x = self._norm(self.layers[layer].input_layernorm, h)
        n = h.shape[0]
        if self._apart(n):
            # A large step: one matmul each, as the Hugging Face forward does, so q, k and v come out
            # contiguous and PyTorch's elementwise passes take the vectorised kernels (the fused output's
            # column slices are strided, which costs more than the launches fusion saves at this size).
            def project(proj, count):
                return F.linear(x, proj.weight, proj.bias).view(n, count, self.head_dim)
            return project(attn.q_proj, self.n_heads), project(attn.k_proj, self.n_kv_heads), project(
                attn.v_proj, self.n_kv_heads)
        qkv = self._linear(x, *fused_projection([attn.q_proj, attn.k_proj, attn.v_proj]))
        width = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        q, k, v = qkv.split([count * self.head_dim for count in width], dim=1)
        return q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim), v.view(n, -1, self.head_dim)

    def _norm(self, norm, h: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm in one fused kernel: normalised and scaled by the weight in float32, rounded
        once to h's dtype (the Hugging Face module rounds before the weight too: within one unit in the
        last place; the same in float32). Four passes over h fewer per norm, two norms per layer. A step
        over few rows takes the Triton kernel (`fused.rms_norm`, the same arithmetic), a third of PyTorch's
        time for one row."""
        if self.fused_kernels and h.dim() == 2 and h.shape[0] <= fused.NORM_ROWS:
            return fused.rms_norm(h, norm.weight, norm.variance_epsilon)
        return F.rms_norm(h, (h.shape[-1],), norm.weight, norm.variance_epsilon)

    def _attention_shape(self, n_queries: int, length: int, capacity: int) -> tuple[int, int]:
        """(queries, keys) attention runs on: exact, or padded to the buckets where the buffer has room."""
        if not self.attention_buckets:
            return n_queries, length
        keys = round_up(length, self.attention_buckets[1])
        if keys > capacity:
            return n_queries, length
        if n_queries == length:  # plain causal: queries pad along with the keys
            return keys, keys
        return min(round_up(n_queries, self.attention_buckets[0]), keys), keys

    def mask(self, positions: torch.Tensor, length: int, capacity: int,
             start: int | None = None) -> "torch.Tensor | SuffixCausal | None":
        """The additive mask `attend` needs for these positions over cache[:length] (None: plain causal);
        built once per set of positions and shared by every layer that computes them. Padded query rows
        (position 0 stands in) see key 0 only; keys past `length` are never seen (positions < length).
        `start`: the caller knows the positions are start..length-1 (prefix mode's computed tokens, blend's
        layers before the check); when they are at least half the keys, a `SuffixCausal` instead."""
        n = positions.shape[0]
        if n == length:
            return None
        if start is not None and start + n == length and 2 * n >= length:
            return SuffixCausal(start)
        if self.scattered_attention:
            return ScatteredCausal(positions.to(torch.int32))
        rows, keys = self._attention_shape(n, length, capacity)
        if rows > n:
            positions = torch.cat((positions, positions.new_zeros(rows - n)))
        return causal_mask(positions, keys, self.dtype)

    def attend(self, layer: int, h, q, positions: torch.Tensor, cache: KVCache, length: int, mask=None):
        """Attention of q over cache[:length] with an exact causal mask from absolute positions, then MLP.

        `mask` (from `mask`) may be passed in when the same positions run through several layers;
        positions are always sorted and unique. On CUDA the queries and keys are padded to bucket
        sizes (zero query rows whose output is dropped, keys the mask hides): one shape serves many
        requests (CUDA_ATTENTION_BUCKETS).
        """
        return self._project(layer, h, self._attend_out(layer, q, h.shape[0], positions, cache, length, mask))

    def _attend_out(self, layer: int, q, n: int, positions: torch.Tensor, cache: KVCache, length: int, mask=None,
                    flat: bool = True):
        """The attention output [n, heads x d] of `attend` (`flat=False`: [n, heads, d], a view, for a
        caller that copies it anyway); q may carry rows past n (a graph bucket's: they stand in for
        padding, and their output is dropped like padding's)."""
        if isinstance(mask, SuffixCausal):  # plain causal over every key, the first `start` query rows zero
            rows, width = self._attention_shape(length, length, cache.capacity)
            keys, values = cache.keys_values(layer, width)
            q = F.pad(q[:n], (0, 0, 0, 0, mask.start, rows - length))
            return self.attention(q, keys, values, None, True, flat)[mask.start : mask.start + n]
        # T == length means positions are exactly 0..length-1: plain causal, which takes the fused
        # kernel instead of materialising a mask.
        causal = n == length
        if mask is None and not causal:
            mask = self.mask(positions, length, cache.capacity)
        if isinstance(mask, ScatteredCausal):
            out = scattered.attention(q[:n], *cache.keys_values(layer, length), mask.positions, self.scale)
            return out.view(n, self.n_heads * self.head_dim) if flat else out
        rows, width = self._attention_shape(n, length, cache.capacity)
        keys, values = cache.keys_values(layer, width)  # [n_kv, width, d]
        q = q[:rows]
        if rows > q.shape[0]:
            q = F.pad(q, (0, 0, 0, 0, 0, rows - q.shape[0]))
        return self.attention(q, keys, values, None if causal else mask, causal, flat)[:n]

    def attention(self, q, keys, values, mask=None, causal: bool = False, flat: bool = True) -> torch.Tensor:
        """q [T, heads, d] over keys and values [n_kv_heads, L, d] (grouped heads shared) -> [T, heads x d]
        (`flat=False`: [T, heads, d], a view of the kernel's output, not yet copied into rows)."""
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                             is_causal=causal, scale=self.scale, enable_gqa=True)
        heads_last = out[0].transpose(0, 1)
        return heads_last.reshape(q.shape[0], self.n_heads * self.head_dim) if flat else heads_last

    def _project(self, layer: int, h, out):
        """Attention output [T, heads x d] -> the layer's output: o_proj, residual, MLP, residual."""
        block = self.layers[layer]
        h = self._plus_linear(h, out, block.self_attn.o_proj)
        mlp = block.mlp
        x = self._norm(block.post_attention_layernorm, h)
        if self._apart(h.shape[0]):  # contiguous gate and up (see `_projected`)
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        else:
            gate, up = self._linear(x, *fused_projection([mlp.gate_proj, mlp.up_proj])).chunk(2, dim=-1)
        return self._plus_linear(h, fused.silu_mul(gate, up) if self.fused_kernels else mlp.act_fn(gate) * up,
                                 mlp.down_proj)

    def _skinny(self, x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
        """Does x @ weight^T go through the few-rows kernel (`skinny_kernel`, a shape it was measured faster on)?"""
        return (self.skinny_kernel and bias is None and x.dim() == 2 and x.shape[0] <= SKINNY_ROWS
                and tuple(weight.shape) in skinny.FASTER and skinny.supports(x.shape[0], *weight.shape, x.dtype))

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        if self._skinny(x, weight, bias):
            return skinny.linear(x, weight)
        return F.linear(x, weight, bias)

    def _plus_linear(self, h: torch.Tensor, x: torch.Tensor, linear) -> torch.Tensor:
        """h + linear(x): the residual added in the few-rows kernel's epilogue, else in the GEMM's (`_plus_linear`)."""
        if h.dim() == 2 and self._skinny(x, linear.weight, linear.bias):
            return skinny.linear(x, linear.weight, residual=h)
        return _plus_linear(h, x, linear)

    def projection_shapes(self) -> list[tuple[int, int]]:
        """The (N, K) of a layer's four projections as the step runs them: q/k/v fused, o, gate/up fused, down."""
        block = self.layers[0]
        weights = [fused_projection([block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj])[0],
                   block.self_attn.o_proj.weight, fused_projection([block.mlp.gate_proj, block.mlp.up_proj])[0],
                   block.mlp.down_proj.weight]
        return [tuple(w.shape) for w in weights]

    def _skinny_shapes(self) -> list[tuple[int, int]]:
        return [shape for shape in self.projection_shapes() if shape in skinny.FASTER]

    def _graphed(self, n: int) -> bool:
        """Does a step over n tokens run through the layer graphs?"""
        return self.graphs is not None and self.graphs.bucket(n) is not None

    def step(self, layer: int, h, positions: torch.Tensor, cache: KVCache, length: int, mask=None, rope=None):
        if self.graphs is not None and self.graphs.pooled_for(h.shape[0], cache):
            # The whole layer as one graph over the KV pool (blend.graphs.LayerGraphs.whole): positions
            # alone fix the causal mask, so `mask` is not needed there.
            return self.graphs.whole(layer, h, positions, cache, length)
        if self._graphed(h.shape[0]):
            bucket, q, kv = self.graphs.pre(layer, h, positions)
            cache.write_stacked(layer, positions, kv)
            # The attention output goes into the graphs' buffer in one copy (not reshaped into rows first).
            return self.graphs.post(bucket, layer,
                                    self._attend_out(layer, q, h.shape[0], positions, cache, length, mask, flat=False))
        if self.fused_kernels:  # RoPE and the KV write in one pass
            q = torch.empty(h.shape[0], self.n_heads, self.head_dim, dtype=h.dtype, device=h.device)
            self.qkv_into(layer, h, positions, rope, q, cache.data[layer], positions)
        else:
            q, k, v = self.qkv(layer, h, positions, rope)
            cache.write(layer, positions, k, v)
        return self.attend(layer, h, q, positions, cache, length, mask)

    def step_each(self, layer: int, h, positions: torch.Tensor, caches: list[KVCache] | None, rope=None,
                  ends: list[int] | None = None, batch: "DecodeBatch | PooledDecode | None" = None,
                  chain: bool = False, layer_graphs: bool = True):
        """`step` for one new token of each of several requests (batched decode): token i, at
        `positions[i]`, is the next token of the request whose buffer is `caches[i]`, and attends to that
        buffer's positions 0..positions[i] only. Projections and MLP run once over all the tokens (the
        weights are read once); attention runs per request over its own cache, or, given `batch`
        (`decode_batch`), once for all of them (a `PooledDecode` carries the caches itself: `caches` may
        be None). `ends` (the positions on the host) spares a device read per request and layer.
        `chain` (every layer run back to back, as `forward_each` does): with the layer graphs, the
        output stays in their buffer for the next layer instead of being copied out. `layer_graphs=False`
        runs the plain step (what a whole-step graph records)."""
        bucket = None
        if layer_graphs and self._graphed(h.shape[0]):
            bucket, q, kv = self.graphs.pre(layer, h, positions)
        elif isinstance(batch, PooledDecode) and self._rope_kernel(rope):
            # RoPE and the new K/V's write into the pool in one kernel (no stack, no index_copy).
            q = torch.empty(h.shape[0], self.n_heads, self.head_dim, dtype=h.dtype, device=h.device)
            self.qkv_into(layer, h, positions, rope, q, batch.pool.layer_rows(layer), batch.slots)
            kv = None
        else:
            q, k, v = self.qkv(layer, h, positions, rope)
            kv = torch.stack((k, v), dim=1)  # once for the batch: each request's row is then one index_copy
        if isinstance(batch, PooledDecode):
            out = batch.attend(self, layer, q[: h.shape[0]], kv)
        else:
            ends = positions.tolist() if ends is None else ends
            if batch is not None:
                out = batch.attend(self, layer, q, kv, caches, ends)
            else:
                outs = []
                for index, cache in enumerate(caches):
                    row = slice(index, index + 1)
                    cache.write_stacked(layer, positions[row], kv[row])
                    # One query at the cache's last filled position sees every key before it: no mask needed.
                    outs.append(self.attention(q[row], *cache.keys_values(layer, ends[index] + 1)))
                out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if bucket is not None:
            return self.graphs.post(bucket, layer, out, chain)
        return self._project(layer, h, out)

    def decode_batch(self, caches: list[KVCache], ends: list[int], positions: torch.Tensor,
                     tokens: list[int] | None = None) -> "DecodeBatch | PooledDecode | None":
        """The shared state of one batched decode step's attention (None: attend per request): over the
        pool where every cache is a range of the step's pool (and the tokens are known on the host),
        else over a gathered copy."""
        pool = self.kv_pool
        if pool is not None and tokens is not None and all(cache.pool is pool for cache in caches):
            return PooledDecode.build(caches, tokens, ends, self.device, self.decode_splits)
        if not self.batched_attention or len(caches) < 2:
            return None
        return DecodeBatch.build(self, ends, positions)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(self._norm(self.hf.model.norm, h)).float()

    def forward_each(self, token_ids, positions: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One new token for each of several requests (see `step_each`); logits [B, vocab]. Where every
        cache is a range of the step's pool, the step runs as one captured graph (`decode_graphs`) or,
        past its buckets, eagerly over the pool."""
        if not len(token_ids) == len(positions) == len(caches):
            raise ValueError(f"{len(token_ids)} tokens, {len(positions)} positions and {len(caches)} caches")
        ends = positions.tolist()  # read once per step, not per request and layer
        tokens = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(tokens, ends, caches)
            if logits is not None:
                return logits
        positions = torch.as_tensor(ends, device=self.device)
        batch = self.decode_batch(caches, ends, positions, tokens)
        if isinstance(batch, PooledDecode):
            return self.decode_pooled(batch)
        graphed = self._graphed(len(ends))
        # The graphs rotate inside their own bodies: eager cos/sin only for the eager step.
        h = self.embed(torch.as_tensor(tokens, device=self.device))
        rope = None if graphed else self.cos_sin(positions)
        for layer in range(self.n_layers):
            # Layers back to back, nothing in between: the graphs' buffer carries h from one to the next.
            h = self.step_each(layer, h, positions, caches, rope, ends, batch, chain=True)
        return self.logits(h)

    def decode_pooled(self, batch: PooledDecode, layer_graphs: bool = True) -> torch.Tensor:
        """Every layer of a decode step over pooled caches; logits [rows, vocab]. The body a
        `DecodeGraphs` graph records (`layer_graphs=False`), and the eager step past its buckets."""
        h, positions = self.embed(batch.tokens), batch.positions
        graphed = layer_graphs and self._graphed(batch.rows)
        # q/k rotate by one matrix per row, in one batched matmul per layer (few rows: a decode step).
        # With the fused kernel, RoPE and the K/V write are one kernel a layer from `cos_sin`'s pair instead.
        rope = None if graphed else (self.rotation(positions) if batch.rows <= ROTATION_MATRIX_ROWS
                                     and not self.fused_kernels else self.cos_sin(positions))
        for layer in range(self.n_layers):
            h = self.step_each(layer, h, positions, None, rope, batch=batch, chain=True, layer_graphs=graphed)
        return self.logits(h)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """All layers over the given tokens; returns logits of every given token. Prefill and decode."""
        length = int(positions.max()) + 1
        h = self.embed(token_ids)
        for layer in range(self.n_layers):
            h = self.step(layer, h, positions, cache, length)
        return self.logits(h)
