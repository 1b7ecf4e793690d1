"""`kvblend bench-service --device cuda`: the served request on a GPU, per mode, tier and load.

For each placement of the chunk KV (GPU tier, CPU tier, Redis only, and half in the CPU tier with
half only in Redis, with the loading controller on and off) it starts `kvblend serve --device cuda`
on the model folder (an 8B-shaped timing checkpoint from `kvblend bench-model`), ingests `--chunks`
documents of about `--chunk-tokens` tokens through IngestChunks (the KV is computed by the server on
the GPU), then, with 1 and with 8 concurrent clients for `--duration` seconds each, asks questions
over all of those chunks (chunk ids, prompt order) in each mode. Reported per row: server-side and
client-side TTFT p50/p99, requests/s, the load-wait share of prefill and what the reports said.

In the same run, before any server starts, `kvblend bench`'s fusor-only rows are timed for the same
prompt shape (no gRPC, no queue, no store lookups), so the service's overhead is a measured ratio.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.bench.service import drive, percentile

GIB = 1 << 30
WORDS = ("river stone harbor lantern meadow copper violet engine orchard signal canyon amber "
         "falcon glacier velvet timber ember quarry pillar saddle").split()


# redis, mixed and mixed-fixed run only with a Redis URL.
SCENARIOS = ("gpu", "cpu", "redis", "mixed", "mixed-fixed", "cpu-fixed", "cpu-eager", "throughput", "decode-eager",
             "decode-graphs", "redis-pull")


@dataclass(frozen=True)
class GpuServiceBenchConfig:
    model: Path  # a checkpoint folder (e.g. from `kvblend bench-model`)
    redis_url: str | None = None  # Redis rows need one
    chunks: int = 10
    chunk_tokens: int = 512
    clients: tuple[int, ...] = (1, 8)
    duration: float = 6.0  # seconds of load per row
    max_new_tokens: int = 4
    json_out: Path = Path("out/bench_service_gpu.json")
    plot: Path | None = None
    fusor_repeats: int = 10
    scenarios: tuple[str, ...] = ("gpu", "cpu", "redis", "mixed", "mixed-fixed")  # see SCENARIOS
    device: str = "cuda"  # "cpu" only to smoke-test the program itself (no figures worth quoting)
    kv_bytes_per_token: int = 128 * 1024  # the model's K/V per token, every layer (8B shape in bf16: 128 KiB)


@dataclass
class Scenario:
    name: str
    store: dict
    server: dict = field(default_factory=dict)
    rows: tuple[tuple[str, float | None], ...] = ()  # (mode, ratio)
    clients: tuple[int, ...] | None = None  # None: the config's
    max_new_tokens: int | None = None  # None: the config's
    # "load": each row a fixed-duration load. "pull": the chunks pushed out to Redis by as many others, then
    # full, one cold blend request, the warm-up's pull, and blend again (run_pull).
    kind: str = "load"


def scenarios(config: GpuServiceBenchConfig) -> list[Scenario]:
    chunk_bytes = config.chunk_tokens * config.kv_bytes_per_token
    blends = (("blend", 0.05), ("blend", 0.15))
    every = (("full", None), ("reuse", None), *blends)
    out = [Scenario("gpu", {"gpu_bytes": 16 * GIB, "cpu_bytes": 4 * GIB}, rows=every),
           Scenario("cpu", {"gpu_bytes": 0, "cpu_bytes": 16 * GIB}, rows=(("full", None), ("reuse", None), *blends))]
    if config.redis_url:
        out.append(Scenario("redis", {"gpu_bytes": 0, "cpu_bytes": 0, "redis_url": config.redis_url},
                            server={"loading_controller": False}, rows=(("blend", 0.15),)))
        # Half the chunks fit the CPU tier; the rest are only in Redis (everything is written through).
        half = {"gpu_bytes": 0, "cpu_bytes": (config.chunks // 2) * chunk_bytes + chunk_bytes // 2,
                "redis_url": config.redis_url, "write_through": True}
        out.append(Scenario("mixed", half, rows=(("full", None), ("blend", 0.15))))
        out.append(Scenario("mixed-fixed", half, server={"loading_controller": False}, rows=(("blend", 0.15),)))
    # Fixed ratios beside the controller's raised one (~0.069 on an H200): does a recompute set whose size
    # changes per request cost more than its FLOPs (docs/gpu.md)?
    out.append(Scenario("cpu-fixed", {"gpu_bytes": 0, "cpu_bytes": 16 * GIB}, server={"loading_controller": False},
                        rows=(("full", None), ("blend", 0.05), ("blend", 0.069), ("blend", 0.15)), clients=(1,)))
    # The same with the per-layer CUDA graphs off (blend/graphs.py): the served gain of the graphs (issue 16).
    out.append(Scenario("cpu-eager", {"gpu_bytes": 0, "cpu_bytes": 16 * GIB},
                        server={"loading_controller": False, "layer_graphs": False},
                        rows=(("full", None), ("blend", 0.05), ("blend", 0.15)), clients=(1,)))
    # Throughput under load (batched decode): chunks in the CPU tier, 64-token answers, up to 32 clients,
    # each decoding in the same batched step; the controller off so both modes do fixed work.
    out.append(Scenario("throughput", {"gpu_bytes": 0, "cpu_bytes": 16 * GIB},
                        server={"max_active": 32, "max_waiting": 128, "rpc_threads": 256, "loading_controller": False},
                        rows=(("full", None), ("blend", 0.15)), clients=(1, 4, 16, 32), max_new_tokens=64))
    # One client decoding alone, eager step against its CUDA graph (blend/graphs.py), 64-token answers:
    # output tokens/s and TTFT of the same rows with only `decode_graphs` different (issue 16).
    for name, graphs in (("decode-eager", False), ("decode-graphs", True)):
        out.append(Scenario(name, {"gpu_bytes": 0, "cpu_bytes": 16 * GIB},
                            server={"loading_controller": False, "decode_graphs": graphs},
                            rows=(("full", None), ("blend", 0.15)), clients=(1,), max_new_tokens=64))
    if config.redis_url:
        # Issue 21: the chunks only in Redis (pushed out of a CPU tier that holds one request's chunks), the
        # controller on: the first blend request against full, then, once the warm-up has pulled the chunks
        # that request recomputed into the CPU tier, the same request again.
        out.append(Scenario("redis-pull", {"gpu_bytes": 0, "cpu_bytes": config.chunks * chunk_bytes + chunk_bytes // 2,
                                           "redis_url": config.redis_url, "write_through": True},
                            rows=(("full", None), ("blend", 0.15)), clients=(1,), kind="pull"))
    unknown = sorted(set(config.scenarios) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    return [s for s in out if s.name in config.scenarios]


def _documents(tokenizer, count: int, tokens: int, first: int = 0) -> list[dict]:
    """`count` distinct passages of about `tokens` model tokens each (one chunk apiece), numbered from `first`."""
    docs = []
    for index in range(first, first + count):
        words, text = [], ""
        while True:
            words.append(WORDS[(index * 7 + len(words) * 3) % len(WORDS)] + str(len(words) % 97))
            candidate = " ".join(words) + "."
            if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > tokens - 24:
                break
            text = candidate
        docs.append({"title": f"Passage {index}", "doc_id": f"bench-{index}", "text": text})
    return docs


def _toml(sections: dict) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


def fusor_figures(config: GpuServiceBenchConfig) -> dict:
    """`kvblend bench`'s rows for the same prompt shape, in this process, before any server starts
    (printed at once, so a run cut short still shows them)."""
    import torch

    from services.bench.gpu import BenchConfig, run_bench

    report = run_bench(BenchConfig(chunks=(config.chunks,), chunk_tokens=config.chunk_tokens,
                                   ratios=(0.05, 0.15), repeats=config.fusor_repeats, json_out=Path("/dev/null")))
    torch.cuda.empty_cache()
    rows = {row["label"]: row for row in report["rows"]}
    print("fusor-only: " + ", ".join(f"{label} {row['ttft_ms']:.1f} ms" for label, row in rows.items()),
          file=sys.stderr, flush=True)
    return rows


def run_row(target: str, chunk_ids: list[str], mode: str, ratio: float | None, clients: int,
            config: GpuServiceBenchConfig, max_new_tokens: int | None = None) -> dict:
    import grpc

    from services.client import Answer, Client

    def ask(client, index: int, turn: int, began: float) -> dict:
        question = f"Which passage names {WORDS[(index + turn) % len(WORDS)]}{turn % 97} first?"
        try:
            stream = client.generate(question, chunk_ids=chunk_ids, mode=mode, ratio=ratio,
                                     max_new_tokens=max_new_tokens or config.max_new_tokens, timeout=120)
            answer = Answer.collect(stream, started=began)
        except grpc.RpcError as err:
            return {"ok": False, "code": err.code().name, "details": err.details()}
        report = answer.report
        return {"ok": True, "client_ttft_s": answer.client_ttft_s, "server_ttft_s": answer.ttft_s,
                "queue_s": report.queue_s, "load_wait_s": report.load_wait_s, "compute_s": report.compute_s,
                "stall_s": report.load_stall_s, "stalled_layers": report.stalled_layers,
                "chunks_hit": dict(report.chunks_hit), "chunks_missing": report.chunks_missing,
                "prompt_tokens": report.prompt_tokens, "ratio": report.ratio,
                "tokens": answer.finish.tokens if answer.finish else 0,
                # the server's time per token after the first (its decode, batched with the other clients')
                "decode_s_per_token": ((answer.finish.seconds - answer.ttft_s) / (answer.finish.tokens - 1)
                                       if answer.finish and answer.finish.tokens > 1 else None),
                "recomputed_chunks": list(report.plan.recompute_chunk_ids), "plan_reason": report.plan.reason}

    records, began = drive(clients, config.duration, lambda: Client(target), ask)
    wall = max((r["end"] for r in records), default=began) - began
    ok = [r for r in records if r["ok"]]
    hits: dict[str, int] = {}
    for r in ok:
        for tier, count in r["chunks_hit"].items():
            hits[tier] = hits.get(tier, 0) + count
    compute = sum(r["compute_s"] for r in ok)
    return {
        "mode": mode, "ratio": ratio, "clients": clients, "requests": len(records), "failed": len(records) - len(ok),
        "failures": sorted({f"{r['code']}: {r['details']}" for r in records if not r["ok"]})[:5],
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
        "server_ttft_p50_ms": 1000 * percentile([r["server_ttft_s"] for r in ok], 0.5),
        "server_ttft_p99_ms": 1000 * percentile([r["server_ttft_s"] for r in ok], 0.99),
        "client_ttft_p50_ms": 1000 * percentile([r["client_ttft_s"] for r in ok], 0.5),
        "client_ttft_p99_ms": 1000 * percentile([r["client_ttft_s"] for r in ok], 0.99),
        "queue_p50_ms": 1000 * percentile([r["queue_s"] for r in ok], 0.5),
        "decode_ms_per_token_p50": 1000 * percentile(
            [r["decode_s_per_token"] for r in ok if r["decode_s_per_token"] is not None], 0.5),
        "load_wait_share": (sum(r["load_wait_s"] for r in ok) / compute) if compute else 0.0,
        "stalled_layers_mean": statistics.fmean(r["stalled_layers"] for r in ok) if ok else 0.0,
        "ratio_run_mean": statistics.fmean(r["ratio"] for r in ok) if ok else 0.0,
        "recomputed_chunks_mean": statistics.fmean(len(r["recomputed_chunks"]) for r in ok) if ok else 0.0,
        "plan_reasons": sorted({r["plan_reason"] for r in ok})[:3],
        "chunks_hit": hits, "chunks_missing": sum(r["chunks_missing"] for r in ok),
        "prompt_tokens": ok[0]["prompt_tokens"] if ok else 0,
    }


def _decode_steps(before, after) -> dict:
    """The server's decode steps between two Stats: the model thread's mean time per step (the step and its
    tokens' emits) and the mean batch; against a request's time per token, what it spends outside them."""
    steps = after.decode_steps - before.decode_steps
    return {"decode_steps": steps,
            "decode_step_ms": 1000 * (after.decode_step_seconds - before.decode_step_seconds) / steps if steps else 0.0,
            "decode_batch_mean": (after.decode_step_tokens - before.decode_step_tokens) / steps if steps else 0.0}


def run_scenario(scenario: Scenario, config: GpuServiceBenchConfig, folder: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from services.bench.launch import ServerProcess
    from services.client import Client

    work = folder / scenario.name
    work.mkdir(parents=True)
    sections = {
        "server": {"chunk_tokens": config.chunk_tokens, "max_new_tokens": 256, "max_waiting": 64,
                   "max_active": 8, "data_dir": str(work / "data"), **scenario.server},
        "model": {"spec": str(config.model), "device": config.device,
                  "dtype": "bfloat16" if config.device == "cuda" else "float32"},
        "store": {"admit_after": 1, "disk_path": "", "redis_prefix": f"kvblend-bench-{scenario.name}-{time.time_ns()}:",
                  **scenario.store},
        "guard": {"fraction": 0.0},
    }
    (work / "serve.toml").write_text(_toml(sections))
    started = time.perf_counter()
    server = ServerProcess(["--config", str(work / "serve.toml")], work / "server.err", start_timeout=600)
    print(f"[{scenario.name}] server up in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = []
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        with Client(server.target) as client:
            client.wait_ready(60)
            response = client.ingest(_documents(tokenizer, config.chunks, config.chunk_tokens), timeout=600)
            chunk_ids = [document.chunk_ids[0] for document in response.documents]
            if scenario.kind == "pull":
                # The CPU tier holds about one request's chunks: twice as many others push every one of ours out.
                others = _documents(tokenizer, 2 * config.chunks, config.chunk_tokens, first=config.chunks)
                client.ingest(others, timeout=600)
                rows = run_pull(server.target, client, chunk_ids, scenario, config)
                return rows
            for mode, ratio in scenario.rows:  # warm-up: first use of each path outside the timed rows
                for _ in range(3):
                    client.answer("Warm up?", chunk_ids=chunk_ids, mode=mode, ratio=ratio, max_new_tokens=2)
            for clients in scenario.clients or config.clients:
                for mode, ratio in scenario.rows:
                    before = client.stats()
                    row = run_row(server.target, chunk_ids, mode, ratio, clients, config, scenario.max_new_tokens)
                    row["scenario"] = scenario.name
                    row.update(_decode_steps(before, client.stats()))
                    rows.append(row)
                    print(f"[{scenario.name}] {mode}@{ratio} x{clients}: server TTFT p50 "
                          f"{row['server_ttft_p50_ms']:.1f} ms p99 {row['server_ttft_p99_ms']:.1f} ms, load wait "
                          f"{100 * row['load_wait_share']:.1f}% of compute, {row['output_tokens_per_s']:.0f} tokens/s, "
                          f"decode {row['decode_ms_per_token_p50']:.2f} ms/token (model thread {row['decode_step_ms']:.2f} ms "
                          f"per step of {row['decode_batch_mean']:.1f}), {row['requests']} calls, {row['failed']} failed, "
                          f"hits {row['chunks_hit']}, ratio run {row['ratio_run_mean']:.3f}, chunks recomputed "
                          f"{row['recomputed_chunks_mean']:.1f}, plan {row['plan_reasons']}", file=sys.stderr, flush=True)
            stats = client.stats()
            loading = stats.loading
            memory = {"device_memory_peak_bytes": stats.device_memory_peak_bytes, "kv_pool_bytes": stats.kv_pool_bytes,
                      "kv_pool_misses": stats.kv_pool_misses}
            print(f"[{scenario.name}] device memory: peak {stats.device_memory_peak_bytes / 1e9:.1f} GB held (KV pool "
                  f"{stats.kv_pool_bytes / 1e9:.1f} GB, {stats.kv_pool_misses} buffers outside it)", file=sys.stderr,
                  flush=True)
            for row in rows:
                row["server_memory"] = memory
                row["server_loading"] = {"planned": loading.planned, "chunks_recomputed": loading.chunks_recomputed,
                                         "read_bytes_per_s": dict(loading.read_bytes_per_s),
                                         "prefill_s_per_token": loading.prefill_s_per_token,
                                         "recompute_s_per_token": loading.recompute_s_per_token}
    finally:
        server.stop()
    return rows


def run_pull(target: str, client, chunk_ids: list[str], scenario: Scenario, config: GpuServiceBenchConfig) -> list[dict]:
    """Full (a load row: also the cold request's kernels warm), then one blend request whose chunks are only
    in Redis (timed alone, `cold`), then wait for the warm-up to pull what it recomputed, then blend again
    (a load row). Returns the three rows; `cold` carries the plan and where the chunks came from."""
    (full_mode, _), (mode, ratio) = scenario.rows
    client.answer("Warm up?", mode=full_mode, max_new_tokens=2, chunk_ids=chunk_ids)
    full = run_row(target, chunk_ids, full_mode, None, 1, config, scenario.max_new_tokens)
    began = time.perf_counter()
    answer = client.answer("Which passage names river first?", chunk_ids=chunk_ids, mode=mode, ratio=ratio,
                           max_new_tokens=config.max_new_tokens)
    report = answer.report
    cold = {"mode": mode, "ratio": ratio, "clients": 1, "requests": 1, "failed": 0, "requests_per_s": 0.0,
            "output_tokens_per_s": 0.0, "server_ttft_p50_ms": 1000 * answer.ttft_s,
            "server_ttft_p99_ms": 1000 * answer.ttft_s, "client_ttft_p50_ms": 1000 * answer.client_ttft_s,
            "client_ttft_p99_ms": 1000 * answer.client_ttft_s, "load_wait_share": 0.0,
            "chunks_hit": dict(report.chunks_hit), "recomputed_chunks_mean": float(len(report.plan.recompute_chunk_ids)),
            "plan_reasons": [report.plan.reason], "ratio_run_mean": report.ratio, "cold": True}
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline and client.stats().warmup.chunks < len(report.plan.recompute_chunk_ids):
        time.sleep(0.5)
    waited = time.perf_counter() - began
    again = run_row(target, chunk_ids, mode, ratio, 1, config, scenario.max_new_tokens)
    again["pulled_after_s"] = round(waited, 1)
    rows = []
    for row, label in ((full, "full"), (cold, "first, chunks only in Redis"), (again, "again, after the pull")):
        row["scenario"], row["step"] = scenario.name, label
        rows.append(row)
        print(f"[{scenario.name}] {label}: {row['mode']}@{row['ratio']} server TTFT p50 {row['server_ttft_p50_ms']:.1f} "
              f"ms, hits {row['chunks_hit']}, chunks recomputed {row.get('recomputed_chunks_mean', 0):.1f}, "
              f"plan {row.get('plan_reasons')}", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict], fusor: dict) -> str:
    columns = ["scenario", "step", "mode", "ratio", "clients", "requests", "failed", "requests_per_s", "output_tokens_per_s",
               "server_ttft_p50_ms",
               "server_ttft_p99_ms", "client_ttft_p50_ms", "client_ttft_p99_ms", "load_wait_share",
               "speedup_vs_full", "vs_fusor", "gain_vs_fusor"]
    cells = []
    for row in rows:
        cells.append([f"{row.get(c):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns])
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines.append("fusor-only (kvblend bench, same prompt shape): " + ", ".join(
        f"{label} {row['ttft_ms']:.1f} ms" for label, row in fusor.items()))
    return "\n".join(lines)


def _compare(rows: list[dict], fusor: dict) -> None:
    """Per row: speed-up over the same scenario's full mode at the same load, the ratio of the server's TTFT to the
    fusor-only figure of the same path (`vs_fusor`), and of the server's speed-up over full to the fusor-only one
    (`gain_vs_fusor`, one client: issue 16's "improved by the same factor as the fusor-only bench, within 20%")."""
    full = {(r["scenario"], r["clients"]): r["server_ttft_p50_ms"] for r in rows if r["mode"] == "full"}
    full_any = {r["clients"]: r["server_ttft_p50_ms"] for r in rows if r["mode"] == "full" and r["scenario"] == "gpu"}
    for row in rows:
        base = full.get((row["scenario"], row["clients"]), full_any.get(row["clients"]))
        row["speedup_vs_full"] = base / row["server_ttft_p50_ms"] if base and row["server_ttft_p50_ms"] else None
        tier = {"gpu": "gpu", "cpu": "cpu", "redis": "redis", "cpu-fixed": "cpu", "cpu-eager": "cpu"}.get(row["scenario"])
        label = ("full" if row["mode"] == "full" else "reuse" if row["mode"] == "reuse"
                 else f"blend@{row['ratio']:g}/{tier}" if tier else None)
        if label and label != "full" and row["scenario"] != "cpu-eager" and row["scenario"] != "redis":
            # The server runs the layer graphs unless the scenario turns them off, and over its KV pool (on by default)
            # each whole layer as one graph (server.pool_layer_graphs): the bench's +poolgraphs rows where it has one.
            label += "+poolgraphs" if f"{label}+poolgraphs" in fusor else "+graphs"
        reference = fusor.get(label) if label else None
        one = reference is not None and row["clients"] == 1
        row["vs_fusor"] = row["server_ttft_p50_ms"] / reference["ttft_ms"] if one else None
        fusor_gain = fusor["full"]["ttft_ms"] / reference["ttft_ms"] if one and "full" in fusor else None
        row["gain_vs_fusor"] = row["speedup_vs_full"] / fusor_gain if fusor_gain and row["speedup_vs_full"] else None


def rescore(path: Path) -> str:
    """A saved run's table (`--json` of `bench-service --device cuda`) compared again by this code's `_compare`."""
    record = json.loads(Path(path).read_text())
    _compare(record["rows"], record["fusor"])
    return f"{record['gpu']}, torch {record['torch']}\n" + format_table(record["rows"], record["fusor"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = [r for r in rows if r["scenario"] == "throughput"]
    rows = [r for r in rows if r["scenario"] != "throughput"]
    if load:  # requests/s against p99 TTFT, one curve per mode, one point per client count
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for mode in sorted({(r["mode"], r["ratio"]) for r in load}, key=str):
            points = [r for r in load if (r["mode"], r["ratio"]) == mode]
            ax.plot([r["server_ttft_p99_ms"] for r in points], [r["requests_per_s"] for r in points], "o-",
                    label=f"{mode[0]}{'@' + format(mode[1], 'g') if mode[1] else ''}")
            for r in points:
                ax.annotate(f"{r['clients']}", (r["server_ttft_p99_ms"], r["requests_per_s"]), fontsize=7)
        ax.set_xlabel("server TTFT p99 (ms)")
        ax.set_ylabel("requests/s")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path.with_name(path.stem + "_throughput" + path.suffix), dpi=120)
        plt.close(fig)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['scenario']}\n{r['mode']}{'@' + format(r['ratio'], 'g') if r['ratio'] else ''}" for r in rows
              if r["clients"] == 1]
    ones = [r["server_ttft_p50_ms"] for r in rows if r["clients"] == 1]
    eights = [r["server_ttft_p50_ms"] for r in rows if r["clients"] != 1]
    positions = range(len(labels))
    ax.bar([p - 0.2 for p in positions], ones, 0.4, label="1 client")
    if len(eights) == len(ones):
        ax.bar([p + 0.2 for p in positions], eights, 0.4, label="8 clients")
    ax.set_xticks(list(positions), labels, fontsize=7)
    ax.set_ylabel("server TTFT p50 (ms)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: GpuServiceBenchConfig) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench-service --device cuda needs a CUDA device")
    fusor = fusor_figures(config)
    folder = Path(tempfile.mkdtemp(prefix="kvblend-gpu-bench-"))
    rows: list[dict] = []

    def write(complete: bool) -> None:
        # After every scenario too, so a run cut by a time limit keeps the rows it measured.
        _compare(rows, fusor)
        record = {"config": {k: str(v) for k, v in asdict(config).items()}, "complete": complete,
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "fusor": fusor}
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(record, indent=1, default=str))

    try:
        for scenario in scenarios(config):
            rows += run_scenario(scenario, config, folder)
            write(complete=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write(complete=True)
    print(format_table(rows, fusor))
    if config.plot:
        plot(rows, config.plot)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":  # python3 -m services.bench.service_gpu --rescore RUN.json
    import argparse

    parser = argparse.ArgumentParser(description=rescore.__doc__)
    parser.add_argument("--rescore", type=Path, required=True)
    print(rescore(parser.parse_args().rescore))
