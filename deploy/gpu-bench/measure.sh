#!/bin/bash
# The device calls' measurements, one step per call (each under the 600 s a call may run), so a call's
# command stays short: `source .devcarry/s/env.sh && bash .devcarry/s/setup_X.sh >/dev/null 2>&1;
# source .devcarry/s/env.sh; bash deploy/gpu-bench/measure.sh STEP`. Output files go to $OUT.
#   bench    (after setup_a)  GPU unit tests on tiny models (<= 200 s), then `kvblend bench` with the Redis row (<= 370 s)
#   bench-source (after setup_a) the request source's CUDA tests (~30 s), then the bench as above
#   kernels  (no setup)       probe_scattered, probe_fused, probe_pool_attention, probe_sdpa              ~60 s
#   service  (after setup_b)  bench-service throughput and cpu scenarios                              ~330 s
#   tests    (after setup_c)  the GPU test modules with the real SmolLM2 (file in $OUT)              ~200 s
#   probe    (no setup)       probe_profile: where each row's time goes (file in $OUT)                 ~60 s
#   host     (no setup)       probe_host: the served head's host time by phase, its cProfile (files in $OUT) ~60 s
set -u
OUT=${OUT:-/tmp/out}

bench() {  # `kvblend bench` with the Redis row ($REPEATS rounds, default 12), the last $1 lines of its output shown
  timeout 370 python3 -m services.commands.cli bench --json "$OUT/bench.json" --repeats "${REPEATS:-12}" --chunks 10 \
    --redis-url redis://127.0.0.1:6379/0 --selectors 'qattn+sink4+nofirst+cachedk,qattn+sink4+nofirst' \
    2>&1 | tail -"$1"
}
case "${1:-}" in
  bench)
    timeout 200 python3 -m pytest -q -rf tests/blend/test_kv_pool.py tests/blend/test_layer_graphs.py \
      tests/blend/test_adapter.py tests/blend/test_graph_decode.py tests/blend/test_scattered.py tests/blend/test_rerotate.py \
      tests/blend/test_fused.py tests/blend/test_pool_attention.py tests/blend/test_question_mass.py tests/store/test_cuda_source.py tests/store/test_dma.py -k "not smollm2" > "$OUT/tests_tiny.txt" 2>&1
    grep -v "CUDAGraph.cpp" "$OUT/tests_tiny.txt" | grep "^FAILED\|^E  \|passed\|failed" | head -30
    bench 70 ;;
  bench-source)  # (after setup_a; a short budget) the request source's CUDA tests only, then the same bench
    timeout 120 python3 -m pytest -q -rf tests/store/test_cuda_source.py tests/store/test_dma.py > "$OUT/tests_tiny.txt" 2>&1
    grep "^FAILED\|passed\|failed" "$OUT/tests_tiny.txt" | head -10
    bench 20 ;;
  kernels)
    timeout 120 python3 -m services.bench.probe_scattered > "$OUT/probe_scattered.txt" 2>&1
    grep "host issue\|dense mask" "$OUT/probe_scattered.txt"
    timeout 60 python3 -m services.bench.probe_fused > "$OUT/probe_fused.txt" 2>&1
    grep "rope\|silu" "$OUT/probe_fused.txt"  # (and silu_mul's block shapes)
    timeout 90 python3 -m services.bench.probe_pool_attention --json "$OUT/probe_pool_attention.json" \
      > "$OUT/probe_pool_attention.txt" 2>&1
    tail -25 "$OUT/probe_pool_attention.txt"
    timeout 90 python3 -m services.bench.probe_sdpa > "$OUT/probe_sdpa.txt" 2>&1  # (decode outside the pool: a plan a token?)
    tail -8 "$OUT/probe_sdpa.txt" ;;
  service)
    timeout 560 python3 -m services.commands.cli bench-service --device cuda --model /tmp/kv/bench-model \
      --redis-url redis://127.0.0.1:6379/0 --scenarios throughput,cpu --duration 3 --json "$OUT/service.json" \
      2>&1 | grep -v '^\[' | tail -30 ;;
  tests)
    if [ -s /tmp/kv/setup_c.err ]; then cat /tmp/kv/setup_c.err; exit 1; fi  # (setup_c's output is not shown)
    timeout 500 python3 -m pytest -q -s tests/services/test_gpu_serving.py tests/blend/test_batched_decode.py \
      tests/blend/test_kv_pool.py tests/blend/test_graph_decode.py tests/store/test_cuda_source.py \
      tests/store/test_store_source.py 2>&1 | grep -v "Loading weights\|Writing model" > "$OUT/tests_smollm2.txt"
    tail -25 "$OUT/tests_smollm2.txt" ;;
  probe)
    timeout 300 python3 -m services.bench.probe_profile > "$OUT/probe_profile.txt" 2>&1
    grep "==\|captured" "$OUT/probe_profile.txt" ;;
  host)
    timeout 300 python3 -m services.bench.probe_host > "$OUT/probe_host.txt" 2>&1
    grep "^== \|head under\|head by part\|^     [A-Za-z_]" "$OUT/probe_host.txt"; sed -n '/== primitives/,$p' "$OUT/probe_host.txt" ;;
  *)
    echo "usage: measure.sh bench|bench-source|kernels|service|tests|probe|host" >&2; exit 2 ;;
esac
