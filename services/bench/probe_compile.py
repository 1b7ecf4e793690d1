"""Probe (not a result): the served Triton kernels compiled for an H200 (sm_90) on a machine without a GPU, their
shared memory, registers and spills, so a kernel that cannot launch there (more shared memory than the card has) or
spills is seen before device time is spent on it.

Compiles each kernel as the served path launches it on the 8B shape (bf16, 32 query heads over 8 KV heads, head
dim 128) and on SmolLM2 (float32, 9 over 3, head dim 64), through Triton's own compiler (`triton.compile` for a
`GPUTarget("cuda", 90, 32)`) and the ptxas Triton ships (`-v` for registers and spills).
Run: python3 -m services.bench.probe_compile
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from blend import fused, question_mass, rerotate, scattered

H200_SHARED = 232448  # bytes of shared memory a block may use on an H200 (sm_90)
SHAPES = {"8B bf16": (4, 128, "*bf16"), "SmolLM2 fp32": (3, 64, "*fp32")}  # (query heads a KV head, dim, dtype)


def _signature(names: str, types: dict) -> dict:
    return {name: types.get(name, "i32") for name in names.split()}


def kernels(share: int, dim: int, dtype: str) -> list[tuple[str, object, dict, dict, tuple[int, int]]]:
    """(name, kernel, signature, constexprs, (warps, stages)) as the served path launches them."""
    mass = dict(R=question_mass.ROWS_FLOAT32 if dtype == "*fp32" else question_mass.ROWS, SHARE=share, D=dim,
                BLOCK=question_mass.BLOCK_T)
    pointers = {"Q": dtype, "K": dtype, "P": "*i64", "M": "*fp32", "L": "*fp32", "Out": "*fp32", "F": "*fp32",
                "scale": "fp32"}
    return [
        ("question_mass._partials", question_mass._partials,
         _signature("Q K P M L T Q0 blocks n_rows scale sq_t sq_h sk_t sk_h", pointers), mass, (4, 1)),
        ("question_mass._mass", question_mass._mass,
         _signature("Q K P M L Out T Q0 blocks n_rows scale sq_t sq_h sk_t sk_h", pointers),
         mass | dict(INTERPRETED_BLOCKS=0), (4, 1)),
        *[(f"scattered._pieces ({stages} stages)", scattered._pieces,
           _signature("Q K V P Out LSE Bounds scale_log2 T piece_keys sq_t sq_h sk_t sk_h sv_t sv_h so_s so_t so_h "
                      "sl_s sl_t", pointers | {"V": dtype, "Out": dtype, "LSE": "*fp32", "Bounds": "*i32",
                                               "P": "*i32", "scale_log2": "fp32"}),
           dict(GROUP=share, D=dim, BLOCK_M=scattered.BLOCK_M, BLOCK_N=scattered.BLOCK_N, SPLIT=False,
                EXACT=dtype == "*fp32", INTERPRETED_KEYS=0, DEVICE_BOUNDS=False, GROUPED=True),
           (scattered.NUM_WARPS, stages)) for stages in (scattered.NUM_STAGES, scattered.NUM_STAGES_MANY)],
        ("fused._rope_qkv", fused._rope_qkv,
         _signature("Q K V C S QO KVO Slots T sq_t sq_h sk_t sk_h sv_t sv_h sc_t so_t so_h skv_t skv_s skv_h",
                    {"Q": dtype, "K": dtype, "V": dtype, "C": dtype, "S": dtype, "QO": dtype, "KVO": dtype,
                     "Slots": "*i64"}),
         dict(HEADS=8 * share, HALF=dim // 2, ROWS=fused.ROPE_ROWS, SLOTS=True), (4, 2)),
        ("rerotate._turn_at", rerotate._turn_at, _signature("K P F T sk_t sk_h", pointers),
         dict(HEADS=8 if dim == 128 else 3, D=dim, BLOCK_T=rerotate.TURN_AT_ROWS, INTERPRETED=False), (4, 2)),
    ]


def _served_attrs(kernel, signature: dict) -> dict:
    """What a served launch specialises on (`scattered._launch`, Triton's own binder): every pointer 16-byte aligned
    (the served tensors are: fresh allocations, views at whole rows, `_send_all`'s padded parts) and every stride a
    multiple of 16 elements (head dims 64 and 128): `tt.divisibility` 16, which vectorised and asynchronous loads need."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
            if kind.startswith("*") or re.fullmatch(r"s[a-z]+_[a-z]", name)}


def compile_one(kernel, signature: dict, constexprs: dict, options: tuple[int, int]) -> dict:
    attrs = _served_attrs(kernel, signature)
    signature = dict(signature) | {name: "constexpr" for name in constexprs}
    started = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=options[0], num_stages=options[1]))
    seconds = time.perf_counter() - started
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else -1

    ttgir = compiled.asm["ttgir"]
    return {"shared": compiled.metadata.shared, "registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "compile_s": seconds,
            "async_loads": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy")}


def main() -> None:
    print(f"Triton {triton.__version__}, target sm_90 (H200: {H200_SHARED} B of shared memory a block)")
    for shape, (share, dim, dtype) in SHAPES.items():
        for name, kernel, signature, constexprs, options in kernels(share, dim, dtype):
            got = compile_one(kernel, signature, constexprs, options)
            verdict = "fits" if got["shared"] <= H200_SHARED else "DOES NOT FIT"
            print(f"{shape:13s} {name:24s} shared {got['shared']:6d} B ({verdict}), {got['registers']} registers, "
                  f"{got['spill_stores']} B spill stores, {got['async_loads']} asynchronous loads (software "
                  f"pipelining), compiled in {got['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
