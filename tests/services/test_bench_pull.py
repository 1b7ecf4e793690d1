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
