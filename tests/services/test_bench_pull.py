"""`bench-service`'s redis-pull scenario (issue 21), run on the CPU with a tiny model against the real Redis:
the flow runs end to end and each step reads from where it should. Its GPU figures come from the H200."""

import redis
from tests.helpers.kv import REDIS_URL

from services.bench.service_gpu import GpuServiceBenchConfig, run_scenario, scenarios


def test_the_pull_scenario_reads_the_first_request_from_redis_and_the_next_ones_from_the_cpu_tier(
        service_model_dir, tmp_path):
    from transformers import AutoConfig

    model = AutoConfig.from_pretrained(service_model_dir)
    head_dim = model.hidden_size // model.num_attention_heads
    kv_bytes = model.num_hidden_layers * 2 * model.num_key_value_heads * head_dim * 4  # float32 on the CPU
    config = GpuServiceBenchConfig(model=service_model_dir, redis_url=REDIS_URL, chunks=3, chunk_tokens=64,
                                   duration=1.0, max_new_tokens=2, device="cpu", kv_bytes_per_token=kv_bytes,
                                   scenarios=("redis-pull",))
    scenario = next(s for s in scenarios(config) if s.name == "redis-pull")
    client = redis.Redis.from_url(REDIS_URL)
    before = set(client.scan_iter(match="kvblend-bench-redis-pull-*"))
    try:
        full, cold, again = run_scenario(scenario, config, tmp_path)
    finally:
        added = set(client.scan_iter(match="kvblend-bench-redis-pull-*")) - before
        if added:
            client.delete(*added)
    assert [row["step"] for row in (full, cold, again)] == ["full", "first, chunks only in Redis",
                                                             "again, after the pull"]
    assert full["failed"] == 0 and again["failed"] == 0 and again["requests"] >= 1
    # The first request found its 3 chunks only in Redis (pushed out of the CPU tier by the 6 ingested after
    # them); on this CPU they load faster than they recompute, so it read them there, and every request
    # after the first of the next row (it may still find a layer or two left in Redis) reads the CPU tier.
    assert cold["chunks_hit"] == {"redis": 3}
    assert again["chunks_hit"].get("cpu", 0) >= 3 * (again["requests"] - 1)


def test_a_load_row_reports_the_model_threads_time_per_decode_step(service_model_dir, tmp_path):
    """`bench-service`'s load rows read the server's decode steps before and after the row: the model
    thread's mean time per step (step and emits) and the mean batch, beside the requests' own time per
    token, so the time a token spends outside the step shows (the H200's 8.45 against 5.88 ms)."""
    config = GpuServiceBenchConfig(model=service_model_dir, chunks=2, chunk_tokens=64, clients=(2,), duration=1.0,
                                   max_new_tokens=6, device="cpu", scenarios=("cpu-fixed",))
    scenario = next(s for s in scenarios(config) if s.name == "cpu-fixed")
    scenario.rows = (("blend", 0.15),)
    (row,) = run_scenario(scenario, config, tmp_path)
    assert row["failed"] == 0 and row["requests"] >= 1
    assert row["decode_steps"] >= 5  # 6 tokens: the first from the prefill, five steps
    assert 1.0 <= row["decode_batch_mean"] <= 2.0
    assert row["decode_step_ms"] > 0 and row["decode_ms_per_token_p50"] > 0  # both read (their ratio is a figure)


def test_the_service_rows_are_compared_with_the_fusor_row_of_the_path_the_server_runs():
    """`_compare`: a blend row of a scenario with the layer graphs is set against the bench's +poolgraphs row where the
    bench has one (the server runs each whole layer as one graph over its KV pool by default), else +graphs; the
    eager scenario against the eager row; `gain_vs_fusor` is the server's speed-up over full against the fusor's."""
    from services.bench.service_gpu import _compare

    fusor = {"full": {"ttft_ms": 100.0}, "blend@0.15/cpu+graphs": {"ttft_ms": 30.0},
             "blend@0.15/cpu+poolgraphs": {"ttft_ms": 20.0}, "blend@0.05/cpu+graphs": {"ttft_ms": 25.0},
             "blend@0.15/cpu": {"ttft_ms": 40.0}}
    rows = [{"scenario": "cpu", "mode": "full", "ratio": None, "clients": 1, "server_ttft_p50_ms": 90.0},
            {"scenario": "cpu", "mode": "blend", "ratio": 0.15, "clients": 1, "server_ttft_p50_ms": 22.5},
            {"scenario": "cpu", "mode": "blend", "ratio": 0.05, "clients": 1, "server_ttft_p50_ms": 30.0},
            {"scenario": "cpu-eager", "mode": "blend", "ratio": 0.15, "clients": 1, "server_ttft_p50_ms": 44.0},
            {"scenario": "cpu", "mode": "blend", "ratio": 0.15, "clients": 8, "server_ttft_p50_ms": 60.0}]
    _compare(rows, fusor)
    pool, graphs, eager, loaded = rows[1], rows[2], rows[3], rows[4]
    assert pool["vs_fusor"] == 22.5 / 20.0 and pool["gain_vs_fusor"] == (90.0 / 22.5) / (100.0 / 20.0)
    assert graphs["vs_fusor"] == 30.0 / 25.0  # no +poolgraphs row for it: the per-layer graphs'
    assert eager["vs_fusor"] == 44.0 / 40.0
    assert loaded["vs_fusor"] is None and loaded["gain_vs_fusor"] is None  # (the fusor's figures are one client's)
