"""Probe (not a result): attention kernels for the shapes the served step runs on an 8B model, to
choose what replaces the dense-mask cuDNN call. Each candidate is checked against a float32
reference and timed (CUDA events, median of 20 after warm-up). Shapes: 32 heads, 8 KV heads, d 128,
5,184-token context (10 x 512 chunks + 64), bf16.

  full     causal over 5,184 tokens: cuDNN exact / padded to 128 / padded to 512, flash
  reuse    32 question queries at the end (bottom-right causal): dense mask (served), flash varlen
  blend    800 scattered queries (15% + question): dense mask (served), split-KV + log-sum-exp merge
  decode   1 and 16 requests' next token: served path, flash varlen over a pooled buffer (+ splits,
           inside a CUDA graph)
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

from blend.adapter import causal_mask

H, KVH, D, L = 32, 8, 128, 5184
DEV, BF = "cuda", torch.bfloat16
SCALE = D ** -0.5
flash = torch.ops.aten._flash_attention_forward.default
cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention.default


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def reference(q, k, v, positions):
    """q [T, H, D] at `positions` over k/v [L, KVH, D] (key j at position j) -> [T, H, D] float32."""
    kk = k.float().repeat_interleave(H // KVH, 1).transpose(0, 1)
    vv = v.float().repeat_interleave(H // KVH, 1).transpose(0, 1)
    s = (q.float().transpose(0, 1) @ kk.transpose(1, 2)) * SCALE
    keys = torch.arange(k.shape[0], device=DEV)
    s = s.masked_fill(keys[None, None, :] > positions[None, :, None], float("-inf"))
    return (s.softmax(-1) @ vv).transpose(0, 1)


def err(out, ref):
    return float((out.float() - ref).abs().max())


ROWS = []


def row(case, name, fn, ref=None, note=""):
    try:
        out = fn()
        e = err(out, ref) if ref is not None else None
        ms = timed(fn)
        ROWS.append({"case": case, "name": name, "ms": round(ms, 4), "max_err": e, "note": note})
        print(f"{case:7s} {name:44s} {ms:8.4f} ms  err {e if e is None else round(e, 4)}  {note}", flush=True)
    except Exception as exc:  # a probe: say what failed and go on
        ROWS.append({"case": case, "name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(f"{case:7s} {name:44s} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def merge(outs, lses):
    """Split-KV partial results [S, T, H, D] and log-sum-exps [S, H, T] -> [T, H, D]."""
    lse = lses.transpose(1, 2).float()  # [S, T, H]
    top = lse.max(0).values
    w = torch.exp(lse - top).nan_to_num_(0.0)  # fully masked splits: weight 0
    w = w / w.sum(0)
    return (outs.float().nan_to_num_(0.0) * w[..., None]).sum(0).to(BF)


def main():
    torch.manual_seed(0)
    kv = torch.randn(L, 2, KVH, D, device=DEV, dtype=BF)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as the served cache holds them

    # --- full causal -------------------------------------------------------------------------------
    qf = torch.randn(L, H, D, device=DEV, dtype=BF)
    for pad in (0, 128, 512):
        n = L if not pad else -(-L // pad) * pad
        qq = F.pad(qf, (0, 0, 0, 0, 0, n - L)).transpose(0, 1)[None]
        kk = F.pad(k, (0, 0, 0, 0, 0, n - L)).transpose(0, 1)[None]
        vv = F.pad(v, (0, 0, 0, 0, 0, n - L)).transpose(0, 1)[None]
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize()
        first = (time.perf_counter() - t0) * 1e3
        row("full", f"cudnn causal keys {n}", lambda: F.scaled_dot_product_attention(
            qq, kk, vv, is_causal=True, enable_gqa=True), note=f"first call {first:.1f} ms")
    cu = torch.tensor([0, L], device=DEV, dtype=torch.int32)
    row("full", "flash varlen causal exact", lambda: flash(qf, k, v, cu, cu, L, L, 0.0, True, False, scale=SCALE)[0])

    # --- reuse: 32 queries at the end ---------------------------------------------------------------
    T = 32
    pos = torch.arange(L - T, L, device=DEV)
    q = torch.randn(T, H, D, device=DEV, dtype=BF)
    ref = reference(q, k, v, pos)
    mask = causal_mask(F.pad(pos, (0, 64 - T)), 5632, BF)
    kp = F.pad(kv, (0, 0, 0, 0, 0, 0, 0, 5632 - L))
    row("reuse", "served: dense mask cudnn (64 x 5632)", lambda: F.scaled_dot_product_attention(
        F.pad(q, (0, 0, 0, 0, 0, 32)).transpose(0, 1)[None], kp[:, 0].transpose(0, 1)[None],
        kp[:, 1].transpose(0, 1)[None], attn_mask=mask, scale=SCALE, enable_gqa=True)[0, :, :T].transpose(0, 1), ref)
    cq = torch.tensor([0, T], device=DEV, dtype=torch.int32)
    for splits in (None, 4, 16):
        kw = {} if splits is None else {"num_splits": splits}
        row("reuse", f"flash varlen bottom-right causal splits={splits}",
            lambda: flash(q, k, v, cq, cu, T, L, 0.0, True, False, scale=SCALE, **kw)[0], ref)

    # --- blend: 800 scattered queries ---------------------------------------------------------------
    g = torch.Generator(device="cpu").manual_seed(1)
    chosen = torch.randperm(L - 64, generator=g)[:768].sort().values
    pos = torch.cat((chosen, torch.arange(L - 32, L))).to(DEV)
    T = pos.numel()
    q = torch.randn(T, H, D, device=DEV, dtype=BF)
    ref = reference(q, k, v, pos)
    Tp = 832
    mask = causal_mask(F.pad(pos, (0, Tp - T)), 5632, BF)
    qp = F.pad(q, (0, 0, 0, 0, 0, Tp - T))
    row("blend", "served: dense mask cudnn (832 x 5632)", lambda: F.scaled_dot_product_attention(
        qp.transpose(0, 1)[None], kp[:, 0].transpose(0, 1)[None], kp[:, 1].transpose(0, 1)[None], attn_mask=mask,
        scale=SCALE, enable_gqa=True)[0, :, :T].transpose(0, 1), ref)
    for S in (2, 4, 8):
        seg = 5632 // S
        ks = kp[:, 0].reshape(S, seg, KVH, D).transpose(1, 2)
        vs = kp[:, 1].reshape(S, seg, KVH, D).transpose(1, 2)
        ms_ = mask[0, 0].reshape(Tp, S, seg).permute(1, 0, 2)[:, None]
        qs = qp.transpose(0, 1)[None].expand(S, H, Tp, D)

        def split(ks=ks, vs=vs, ms_=ms_, qs=qs):
            out, lse = cudnn(qs, ks, vs, ms_, True, scale=SCALE)[:2]
            return merge(out.transpose(1, 2), lse[..., 0] if lse.dim() == 4 else lse)[:T]
        row("blend", f"split-KV x{S} cudnn masked + lse merge", split, ref)
        ksx, vsx = ks.repeat_interleave(4, 1), vs.repeat_interleave(4, 1)

        def split_eff(ksx=ksx, vsx=vsx, ms_=ms_, qs=qs):
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                qs, ksx, vsx, ms_.expand(S, H, Tp, seg), True, scale=SCALE)[:2]
            return merge(out.transpose(1, 2), lse[..., :Tp])[:T]
        row("blend", f"split-KV x{S} efficient (kv expanded) + merge", split_eff, ref)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        t0 = time.perf_counter()
        fa = torch.compile(flex_attention, dynamic=False)
        pos_p = F.pad(pos, (0, Tp - T))

        def mod(b, h, qi, ki):
            return pos_p[qi] >= ki
        bm = create_block_mask(mod, None, None, Tp, 5632, device=DEV)
        qq, kk, vv = qp.transpose(0, 1)[None], kp[:, 0].transpose(0, 1)[None], kp[:, 1].transpose(0, 1)[None]
        fa(qq, kk, vv, block_mask=bm, scale=SCALE, enable_gqa=True)
        torch.cuda.synchronize()
        note = f"compile {time.perf_counter() - t0:.1f} s"
        row("blend", "flex_attention block mask", lambda: fa(qq, kk, vv, block_mask=bm, scale=SCALE, enable_gqa=True)[
            0, :, :T].transpose(0, 1), ref, note)
        row("blend", "create_block_mask per request", lambda: create_block_mask(mod, None, None, Tp, 5632, device=DEV))
    except Exception as exc:
        print("flex_attention FAILED", type(exc).__name__, str(exc)[:300], flush=True)
        ROWS.append({"case": "blend", "name": "flex_attention", "error": str(exc)[:300]})

    # --- decode -------------------------------------------------------------------------------------
    for B in (1, 16):
        cap = 5632
        pool = torch.randn(B * cap, 2, KVH, D, device=DEV, dtype=BF)
        ends = [L - 1 - 37 * i for i in range(B)]
        q = torch.randn(B, H, D, device=DEV, dtype=BF)
        refs = torch.cat([reference(q[i:i + 1], pool[i * cap:(i + 1) * cap, 0], pool[i * cap:(i + 1) * cap, 1],
                                    torch.tensor([ends[i]], device=DEV)) for i in range(B)])
        if B == 1:
            row("decode", "served B=1: cudnn sdpa, no mask", lambda: F.scaled_dot_product_attention(
                q[:, :, None], pool[: ends[0] + 1, 0].transpose(0, 1)[None], pool[: ends[0] + 1, 1].transpose(0, 1)[None],
                scale=SCALE, enable_gqa=True)[:, :, 0], refs)
        else:
            width = 5632
            buf = torch.zeros(B, width, 2, KVH, D, device=DEV, dtype=BF)
            last = torch.tensor(ends, device=DEV)
            dmask = torch.zeros(B, width, device=DEV, dtype=BF).masked_fill_(
                torch.arange(width, device=DEV)[None] > last[:, None], float("-inf"))[:, None, None]

            def gathered():
                torch._foreach_copy_([buf[i, : e + 1] for i, e in enumerate(ends)],
                                     [pool[i * cap: i * cap + e + 1] for i, e in enumerate(ends)])
                return F.scaled_dot_product_attention(q[:, :, None], buf[:, :, 0].transpose(1, 2),
                                                      buf[:, :, 1].transpose(1, 2), attn_mask=dmask, scale=SCALE,
                                                      enable_gqa=True)[:, :, 0]
            row("decode", "served B=16: gather + dense mask", gathered, refs)
        cq = torch.arange(B + 1, device=DEV, dtype=torch.int32)
        ck = torch.tensor([i * cap for i in range(B)] + [B * cap], device=DEV, dtype=torch.int32)
        used = torch.tensor([e + 1 for e in ends], device=DEV, dtype=torch.int32)
        for splits in (None, 8, 16, 32):
            kw = {} if splits is None else {"num_splits": splits}

            def var(kw=kw):
                return flash(q, pool[:, 0], pool[:, 1], cq, ck, 1, cap, 0.0, False, False, scale=SCALE,
                             seqused_k=used, **kw)[0]
            row("decode", f"B={B} flash varlen pool seqused splits={splits}", var, refs)
            if splits in (None, 16):
                try:
                    var()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = var()
                    row("decode", f"B={B} ... same inside a CUDA graph", lambda out=out, graph=graph: (graph.replay(), out)[1],
                        refs)
                except Exception as exc:
                    print("graph FAILED", type(exc).__name__, str(exc)[:300], flush=True)
                    ROWS.append({"case": "decode", "name": f"graph B={B}", "error": str(exc)[:300]})
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
