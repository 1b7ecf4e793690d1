"""`kvblend bench-hardening`: issue 19's starvation and head-of-line scenarios, re-run against a real server.

Starts `kvblend serve` (the embedded SmolLM2-135M on the CPU, default `[server]` limits) unless `--server`
names one.

Starvation (item 1): one long Generate (full prefill, `--long-tokens` new tokens) streams while
`--ingests` tiny IngestChunks calls are sent at once and, 0.3 s into that, one short Generate with a
5 s deadline. A probe thread calls Health.Check, Stats and Retrieve, each with a 1 s deadline, one
after the other every 0.1 s from before the ingests until every one has ended. Printed: the slowest
answer of each probe call and any that failed, how the ingests ended (OK, refused with
RESOURCE_EXHAUSTED, and the slowest refusal), and the short Generate.

Head-of-line (item 2): tenant `a` sends a query of about 3,000 tokens (counted with the model's tokenizer)
with a 2 s deadline; 0.3 s later tenant `b` sends a short request (77 tokens of prompt with the chat template) and,
2.5 s after `a`'s call, tenant `c` sends the same. Printed: `b`'s and `c`'s queue_s, TTFT and whole
call as the server and client saw them, and how `a` ended and when.

Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SEED_DOCUMENT = {"title": "Lighthouses", "doc_id": "lighthouses",
                 "text": "The lighthouse on the northern cape has four lamps and was first lit in 1871. Its "
                         "keeper rowed to the island every Sunday to collect oil, bread and the post."}
SHORT_QUERY = ("In two short sentences, and without any preamble, tell me how many lamps the lighthouse on the "
               "northern cape has and in which year it was first lit, then say who brought the oil.")
PROBE_DEADLINE_S = 1.0


def long_query(items: int) -> str:
    """The head-of-line query: `items` sentences of about 9.5 tokens each (315: about 3,000 tokens)."""
    return " ".join(f"word{i % 50} is item {i}." for i in range(items))


@dataclass(frozen=True)
class HardeningBenchConfig:
    server: str | None = None  # HOST:PORT of a running server; None starts one here
    model: str = "smollm2-135m"  # model of the server started here
    cache_dir: str | None = None
    ingests: int = 110  # tiny IngestChunks calls sent at once
    long_tokens: int = 1000  # new tokens of the Generate that streams during the ingests
    long_query_items: int = 315  # "wordN is item N." sentences of the head-of-line query (~9.5 tokens each)
    long_deadline_s: float = 2.0
    json_out: Path | None = Path("out/bench_hardening.json")


class Probe:
    """Health.Check, Stats and Retrieve (or those of them in `names`), one after the other every 0.1 s on a
    thread of its own (a 1 s deadline each): the slowest answer of each and the calls that failed."""

    def __init__(self, client, names: tuple[str, ...] = ("health", "stats", "retrieve")):
        self.client = client
        self.names = names
        self.slowest = {name: 0.0 for name in names}
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import grpc

        calls = {"health": lambda: self.client.health(timeout=PROBE_DEADLINE_S),
                 "stats": lambda: self.client.stats(timeout=PROBE_DEADLINE_S),
                 "retrieve": lambda: self.client.retrieve("How many lamps?", k=1, timeout=PROBE_DEADLINE_S)}
        calls = {name: call for name, call in calls.items() if name in self.names}
        while not self._stop.is_set():
            for name, call in calls.items():
                began = time.perf_counter()
                try:
                    call()
                except grpc.RpcError as err:
                    self.failures.append(f"{name}: {err.code().name} {err.details()}")
                self.slowest[name] = max(self.slowest[name], time.perf_counter() - began)
                self.calls += 1
            self._stop.wait(0.1)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _ended(call) -> tuple[str, str]:
    """(status name, details) of a call that has ended."""
    error = call.exception()
    return ("OK", "") if error is None else (error.code().name, (error.details() or "")[:200])


def starvation(target: str, config: HardeningBenchConfig) -> dict:
    import grpc

    from proto import kvblend_pb2 as pb
    from services.client import Answer, Client

    with Client(target, tenant="starvation") as client, Client(target, tenant="starvation") as prober:
        client.wait_ready(60)
        seed = client.ingest([SEED_DOCUMENT], timeout=120).documents[0].chunk_ids[0]
        long = client.generate("Tell me a very long story about the lighthouse.", chunk_ids=[seed], mode="full",
                               max_new_tokens=config.long_tokens, timeout=600)
        long_status: list[str] = []

        def read_long() -> None:
            try:
                Answer.collect(long)
                long_status.append("OK")
            except grpc.RpcError as err:  # CANCELLED once the ingests have ended: it has served its purpose
                long_status.append(err.code().name)

        reader = threading.Thread(target=read_long, daemon=True)
        reader.start()
        ended: dict[int, tuple[float, str, str]] = {}

        def on_done(index: int, sent: float):
            return lambda call: ended.__setitem__(index, (time.perf_counter() - sent, *_ended(call)))

        with Probe(prober) as probe:
            time.sleep(0.3)  # the long answer is decoding
            began = time.perf_counter()
            calls = []
            for i in range(config.ingests):
                request = pb.IngestRequest(documents=[pb.Document(
                    text=f"Tiny fact number {i}: the lighthouse on island {i} has {i + 3} lamps.",
                    title=f"fact {i}", doc_id=f"fact-{i}")])
                call = client.stub.IngestChunks.future(request, timeout=120, metadata=client.metadata)
                call.add_done_callback(on_done(i, time.perf_counter()))
                calls.append(call)
            time.sleep(0.3)
            short_began = time.perf_counter()
            short_call = client.generate(SHORT_QUERY, chunk_ids=[seed], mode="reuse", max_new_tokens=4, timeout=5.0)
            try:
                short = Answer.collect(short_call, started=short_began)
                short_status = "OK"
            except grpc.RpcError as err:
                short, short_status = None, err.code().name
            short_s = time.perf_counter() - short_began
            for call in calls:
                call.exception(timeout=120)
            storm_s = time.perf_counter() - began
        long.cancel()
        reader.join(30)
    codes: dict[str, int] = {}
    for _, code, _ in ended.values():
        codes[code] = codes.get(code, 0) + 1
    refused = [seconds for seconds, code, _ in ended.values() if code == "RESOURCE_EXHAUSTED"]
    return {
        "ingests_sent": config.ingests, "ingests_by_status": codes,
        "slowest_refusal_s": max(refused, default=None),
        "slowest_ingest_s": max((seconds for seconds, _, _ in ended.values()), default=None),
        "refusal_details": sorted({details for _, code, details in ended.values() if code == "RESOURCE_EXHAUSTED"}),
        "probe_calls": probe.calls, "probe_slowest_s": probe.slowest, "probe_failures": probe.failures[:10],
        "short_generate": {"status": short_status, "call_s": short_s,
                           "queue_s": short.report.queue_s if short else None,
                           "ttft_s": short.ttft_s if short else None},
        "storm_s": storm_s, "long_generate_status": long_status[0] if long_status else None,
    }


def head_of_line(target: str, config: HardeningBenchConfig, long_tokens: int | None) -> dict:
    import grpc

    from services.client import Answer, Client

    query = long_query(config.long_query_items)
    outcome: dict = {}

    def ask_long(client) -> None:
        began = time.perf_counter()
        try:
            Answer.collect(client.generate(query, mode="full", max_new_tokens=4,
                                           timeout=config.long_deadline_s))
            outcome.update(status="OK")
        except grpc.RpcError as err:
            outcome.update(status=err.code().name)
        outcome["ended_after_s"] = time.perf_counter() - began

    def ask_short(client, into: dict, since: float) -> None:
        began = time.perf_counter()
        answer = Answer.collect(client.generate(SHORT_QUERY, mode="full", max_new_tokens=8, timeout=300),
                                started=began)
        into.update(queue_s=answer.report.queue_s, server_ttft_s=answer.ttft_s, client_ttft_s=answer.client_ttft_s,
                    call_s=time.perf_counter() - began, prompt_tokens=answer.report.prompt_tokens,
                    sent_at_s=began - since)

    b, c = {}, {}
    with Client(target, tenant="a") as ca, Client(target, tenant="b") as cb, Client(target, tenant="c") as cc:
        for client in (ca, cb, cc):
            client.wait_ready(60)
        ask_short(cc, {}, time.perf_counter())  # warm: the first Generate's one-time costs, outside the figures
        sent = time.perf_counter()
        long_thread = threading.Thread(target=ask_long, args=(ca,))
        long_thread.start()
        time.sleep(0.3)
        ask_short(cb, b, sent)
        time.sleep(max(0.0, sent + config.long_deadline_s + 0.5 - time.perf_counter()))
        ask_short(cc, c, sent)
        long_thread.join(600)
    return {"long_query_tokens": long_tokens, "long_deadline_s": config.long_deadline_s, "long": outcome,
            "short_b_during_long_prefill": b, "short_c_after_long_deadline": c}


def _count_tokens(model: str, cache_dir: str | None, text: str) -> int | None:
    try:
        from transformers import AutoTokenizer

        from blend.loader import resolve
        from services.settings import ModelConfig

        folder = Path(cache_dir).expanduser() if cache_dir else ModelConfig().cache_dir
        tokenizer = AutoTokenizer.from_pretrained(resolve(model, folder))
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - the count is a label; a server elsewhere may run another model
        return None


def format_table(result: dict) -> str:
    s, h = result["starvation"], result["head_of_line"]
    slowest = s["probe_slowest_s"]
    rows = [
        ("starvation: ingests sent at once / by status", f"{s['ingests_sent']} / " + ", ".join(
            f"{code} {n}" for code, n in sorted(s["ingests_by_status"].items()))),
        ("slowest refusal / slowest ingest (s)", f"{s['slowest_refusal_s'] or 0:.3f} / {s['slowest_ingest_s']:.3f}"),
        ("probe calls (1 s deadline each) / failed", f"{s['probe_calls']} / {len(s['probe_failures'])}"),
        ("slowest Health.Check / Stats / Retrieve (s)",
         f"{slowest['health']:.3f} / {slowest['stats']:.3f} / {slowest['retrieve']:.3f}"),
        ("short Generate (5 s deadline): status, call (s)",
         f"{s['short_generate']['status']}, {s['short_generate']['call_s']:.2f}"),
        ("head-of-line: long query tokens, deadline (s)", f"{h['long_query_tokens']}, {h['long_deadline_s']:g}"),
        ("long request: status, ended after (s)", f"{h['long']['status']}, {h['long']['ended_after_s']:.2f}"),
    ]
    for name, key in (("b, 0.3 s into the long prefill", "short_b_during_long_prefill"),
                      ("c, 0.5 s after the long deadline", "short_c_after_long_deadline")):
        r = h[key]
        rows.append((f"short request {name}: queue_s / TTFT / call (s)",
                     f"{r['queue_s']:.3f} / {r['server_ttft_s']:.3f} / {r['call_s']:.3f} "
                     f"({r['prompt_tokens']} prompt tokens)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def run(config: HardeningBenchConfig) -> int:
    """The scenarios as a program: prints the table, writes JSON; 0 when the acceptance figures hold
    (every probe call answered within 1 s, b's queue_s under 5 s)."""
    from services.bench.launch import ServerProcess

    load_before = os.getloadavg()
    folder = None
    server = None
    target = config.server
    if target is None:
        folder = Path(tempfile.mkdtemp(prefix="kvblend-hardening-"))
        args = ["--model", config.model, "--data-dir", str(folder / "data")]
        if config.cache_dir:
            args += ["--cache-dir", config.cache_dir]
        server = ServerProcess(args, folder / "server.err")
        target = server.target
        print(f"started kvblend serve on {target}", file=sys.stderr, flush=True)
    try:
        tokens = _count_tokens(config.model, config.cache_dir, long_query(config.long_query_items))
        result = {"starvation": starvation(target, config), "head_of_line": head_of_line(target, config, tokens)}
    finally:
        if server is not None:
            server.stop()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    print(format_table(result))
    s, b = result["starvation"], result["head_of_line"]["short_b_during_long_prefill"]
    held = (not s["probe_failures"] and max(s["probe_slowest_s"].values()) < PROBE_DEADLINE_S
            and b["queue_s"] < 5.0)
    record = {"command": "kvblend bench-hardening " + " ".join(sys.argv[2:]), "args": asdict(config),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average_before": load_before,
                          "load_average_after": os.getloadavg()},
              "result": result, "acceptance_held": held}
    if config.json_out:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {config.json_out}", file=sys.stderr)
    return 0 if held else 1
