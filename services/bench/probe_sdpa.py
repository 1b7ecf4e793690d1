"""Probe (not a result): SDPA backends on masked / causal attention with GQA, new shapes vs repeated.
`decode-1-masked`: one query row over a key length one longer each call, with a mask; `decode-1-unmasked` without
one, as a single request decoding outside the KV pool attends (`LlamaStep.step_each` -> `attention`, exactly its keys
so far), with PyTorch's default backends and with flash alone: whether a new length costs a new plan (first call >>
repeated)."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from blend.adapter import causal_mask
from services.bench.probe_shapes import _ms as ms


def main():
    dev, bf = "cuda", torch.bfloat16
    for name in ("causal-default", "causal-flash", "masked-efficient-expanded", "masked-cudnn-bucketed",
                 "decode-1-masked", "decode-1-unmasked", "decode-1-unmasked-flash"):
        firsts, again = [], []
        for i in range(6):
            n = 5184 + (i if name.startswith("decode") else 37 * i) + 1
            t = n if name.startswith("causal") else 1 if name.startswith("decode") else 400 + 11 * i
            q = torch.randn(1, 32, t, 128, device=dev, dtype=bf)
            k = torch.randn(1, 8, n, 128, device=dev, dtype=bf)
            v = torch.randn_like(k)
            mask = causal_mask(torch.arange(n - t, n, device=dev), n, bf)
            if name == "decode-1-masked":
                fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
            elif name == "decode-1-unmasked":
                fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            elif name == "decode-1-unmasked-flash":
                def fn():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            elif name == "causal-default":
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
            elif name == "causal-flash":
                def fn():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif name == "masked-efficient-expanded":
                def fn():
                    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                        F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                       attn_mask=mask)
            else:
                tb, lb = -(-t // 64) * 64, -(-n // 512) * 512
                kp = torch.zeros(1, 8, lb, 128, device=dev, dtype=bf)
                maskp = torch.full((1, 1, tb, lb), float("-inf"), device=dev, dtype=bf)
                maskp[..., :t, :n] = mask
                maskp[..., t:, 0] = 0
                def fn():
                    qp = F.pad(q, (0, 0, 0, tb - t))
                    F.scaled_dot_product_attention(qp, kp, kp, attn_mask=maskp, enable_gqa=True)[:, :, :t]
            firsts.append(ms(fn))
            again.append(min(ms(fn) for _ in range(3)))
        print(f"{name:26s}: new shape median {sorted(firsts)[3]:7.2f} ms, repeated {sorted(again)[3]:6.2f} ms")


if __name__ == "__main__":
    main()
