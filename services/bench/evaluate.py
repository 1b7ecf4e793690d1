"""`kvblend eval`: TTFT and answer quality of full / prefix / reuse / blend on a MuSiQue-shaped file.

Per question: build the prompt from its passages, precompute every chunk's KV (not timed), then for
each row time request start to first-token logits and decode the answer greedily. Speed-ups are
ratios taken per question in the same run, then the median; quality is compared to full prefill on
the same question (first-token KL and agreement, answer F1) and to the gold answers.
"""

from __future__ import annotations

import json
import logging
import re
import string
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from blend.quality import kl_divergence
from blend.cache import ChunkKV
from blend.decode import greedy, stop_token_ids
from blend.fusor import MODES, BlendConfig, MemorySource, cached_entries, compute_kv, prefill
from blend.loader import LoadedModel, load
from blend.prompt import DEFAULT_SYSTEM, PromptLayout, build_layout, format_passage
from blend.selectors import parse_selector
from retriever.sources import read_musique
from services.settings import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    dataset: Path
    json_out: Path
    limit: int | None = None
    chunks: int | None = None
    modes: tuple[str, ...] = MODES
    ratios: tuple[float, ...] = (0.05, 0.15, 0.3, 1.0)
    selectors: tuple[str, ...] = (BlendConfig.selector,)
    check_layer: int = 1
    gradual_layers: int = 0
    max_new_tokens: int = 16
    hf: bool = True
    plot: Path | None = None
    # Also run reuse and blend rows on chunk KV round-tripped through the store's int8 codec (what
    # the Redis and disk tiers hold with quantization on), labelled "/int8".
    kv_int8: bool = False

    def __post_init__(self):
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r} in --modes (choose from {', '.join(MODES)})")
        for selector in self.selectors:
            parse_selector(selector)  # a ValueError naming the selector or its bad option
        for ratio in self.ratios:  # BlendConfig is where a ratio is checked; say which flag held it
            try:
                BlendConfig(mode="blend", ratio=ratio)
            except ValueError as err:
                raise ValueError(f"--ratios: {err}") from None
        for name in ("limit", "chunks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value} must be >= 1")

    def rows(self) -> list[BlendConfig]:
        rows = []
        for mode in self.modes:
            if mode != "blend":
                rows.append(BlendConfig(mode=mode))
                continue
            for selector in self.selectors:
                # At ratio 1 every chunk token is recomputed whatever the selector: one row is enough.
                rows += [BlendConfig(mode="blend", ratio=r, selector=selector, check_layer=self.check_layer)
                         for r in self.ratios if r < 1.0 or selector == self.selectors[0]]
            if self.gradual_layers:
                rows += [BlendConfig(mode="blend", ratio=r, selector=self.selectors[0], check_layer=self.check_layer,
                                     gradual_layers=self.gradual_layers) for r in self.ratios if r < 1.0]
        return rows

    def int8_rows(self) -> list[BlendConfig]:
        if not self.kv_int8:
            return []
        # Reuse has no selector (its config carries the default one): it is always kept.
        return [r for r in self.rows() if r.mode == "reuse" or (r.mode == "blend" and r.selector == self.selectors[0]
                and not r.gradual_layers and r.ratio < 1.0)]


def int8_roundtrip(entry: ChunkKV) -> ChunkKV:
    from store.codec import decode, encode

    kv = decode(encode(entry.kv.cpu(), quantize_floats=True)).to(entry.kv.device)
    return ChunkKV(entry.token_ids, entry.start, kv)


# --- dataset ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """An evaluation item: its passages formatted as the prompt places them."""

    question: str
    answers: tuple[str, ...]
    passages: tuple[str, ...]


def load_dataset(path: Path, limit: int | None = None, chunks: int | None = None) -> list[Question]:
    """The first `limit` questions of a MuSiQue-shaped file, each with its first `chunks` passages."""
    return [Question(q.question, q.answers,
                     tuple(format_passage(p.title, p.text) for p in q.passages if p.text.strip())[:chunks])
            for q in read_musique(path, limit)]


# --- metrics (SQuAD normalisation, as CacheBlend's evaluation) -------------------------------------


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    ttft_s: float
    answer: str | None
    first_token: int
    logits: torch.Tensor = field(repr=False)
    recomputed: int = 0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed_hf(model: LoadedModel, ids: list[int]) -> Sample:
    tensor = torch.tensor([ids], device=model.step.device)
    _sync(model.step.device)
    start = time.perf_counter()
    # What users run today: the model's own forward as generate() calls it for the prompt.
    logits = model.step.hf(tensor, use_cache=True, logits_to_keep=1).logits[0, -1].float()
    _sync(model.step.device)
    elapsed = time.perf_counter() - start
    return Sample(elapsed, None, int(logits.argmax()), logits)


def _timed_mode(model: LoadedModel, layout, config: BlendConfig, prefix, chunks, max_new: int, stops) -> Sample:
    entries = cached_entries(config.mode, prefix, chunks, layout)
    source = MemorySource(entries) if entries else None
    _sync(model.step.device)
    start = time.perf_counter()
    filled = prefill(model.step, layout, config, source, len(layout) + max_new)
    _sync(model.step.device)
    elapsed = time.perf_counter() - start
    tokens = list(greedy(model.step, filled.cache, filled.length, filled.logits, max_new, stops))
    answer = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Sample(elapsed, answer, int(filled.logits.argmax()), filled.logits, filled.recomputed)


def _warm_up(model: LoadedModel, question: Question, rows, hf: bool, stops) -> None:
    """One untimed pass of every path on a short prompt, so one-time costs do not land in a row."""
    full = build_layout(model.tokenizer, list(question.passages[:2]), question.question, DEFAULT_SYSTEM)
    layout = PromptLayout(full.prefix, tuple(chunk[:128] for chunk in full.chunks), full.suffix[-64:])
    prefix = compute_kv(model.step, layout.prefix)
    chunks = [compute_kv(model.step, ids, behind=prefix) for ids in layout.chunks]
    if hf:
        _timed_hf(model, layout.token_ids)
    for config in rows:
        _timed_mode(model, layout, config, prefix, chunks, 2, stops)


def summarize(per_question: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    for label in labels:
        done = [q for q in per_question if label in q["rows"]]
        if not done:
            continue
        cells = [q["rows"][label] for q in done]
        full = [q["rows"].get("full") for q in done]
        hf = [q["rows"].get("hf_full") for q in done]
        reuse = [q["rows"].get("reuse") for q in done]

        def mean(values):
            values = [v for v in values if v is not None]
            return round(statistics.fmean(values), 4) if values else None

        def median_ratio(bases):
            pairs = [(b["ttft_s"], c["ttft_s"]) for b, c in zip(bases, cells) if b is not None]
            return round(statistics.median(b / c for b, c in pairs), 3) if pairs else None

        wins = [c["kl_first_token"] < r["kl_first_token"] for c, r in zip(cells, reuse)
                if r is not None and c.get("kl_first_token") is not None]
        rows.append({
            "label": label,
            "mode": cells[0]["mode"], "ratio": cells[0]["ratio"], "selector": cells[0]["selector"],
            "n": len(cells),
            "ttft_median_s": round(statistics.median(c["ttft_s"] for c in cells), 4),
            "ttft_speedup": median_ratio(full),
            "ttft_speedup_vs_hf": median_ratio(hf),
            "f1_gold": mean(c["f1_gold"] for c in cells),
            "f1_vs_full": mean(c["f1_vs_full"] for c in cells),
            "first_token_agree": mean(c["first_token_agree"] for c in cells),
            "kl_first_token": mean(c["kl_first_token"] for c in cells),
            "kl_win_vs_reuse": round(sum(wins) / len(wins), 3) if wins and label != "reuse" else None,
            "recomputed_tokens": mean(c["recomputed"] for c in cells),
            "recompute_fraction": mean(c.get("recompute_fraction") for c in cells),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    columns = ["label", "n", "ttft_median_s", "ttft_speedup", "ttft_speedup_vs_hf", "kl_first_token",
               "kl_win_vs_reuse", "first_token_agree", "f1_vs_full", "f1_gold", "recomputed_tokens",
               "recompute_fraction"]
    cells = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def selector_curves(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Blend rows as one (mean recompute fraction, mean KL) curve per selector variant, by fraction.

    A variant is the label after the ratio ("qattn+sink4", "k/gradual2", "k/int8"); reuse starts
    every curve at fraction 0, so curves of different selectors compare at equal recompute.
    """
    reuse = {row["label"].removeprefix("reuse"): row for row in rows if row["mode"] == "reuse"}
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["mode"] != "blend" or row["kl_first_token"] is None or row["recompute_fraction"] is None:
            continue
        curves.setdefault(row["label"].split("/", 1)[1], []).append((row["recompute_fraction"], row["kl_first_token"]))
    for variant, points in curves.items():
        base = reuse.get("/int8" if variant.endswith("/int8") else "")
        if base is not None and base["kl_first_token"] is not None:
            points.append((0.0, base["kl_first_token"]))
        points.sort()
    return curves


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: KL against median TTFT, every row. Right: KL against recompute fraction, per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, curves_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in rows:
        if row["kl_first_token"] is None:
            continue
        ax.scatter(row["ttft_median_s"], row["kl_first_token"], s=40)
        ax.annotate(row["label"], (row["ttft_median_s"], row["kl_first_token"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("median TTFT (s)")
    ax.set_ylabel("first-token KL(full || mode), lower is better")
    for variant, points in selector_curves(rows).items():
        curves_ax.plot([f for f, _ in points], [kl for _, kl in points], marker="o", label=variant)
    curves_ax.set_xlabel("mean recompute fraction of chunk tokens")
    curves_ax.set_ylabel("first-token KL(full || blend)")
    curves_ax.legend(fontsize=7)
    for axis in (ax, curves_ax):
        axis.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(model: LoadedModel, config: EvalConfig, questions: list[Question], progress=True) -> dict:
    from tqdm import tqdm

    rows = config.rows()
    if "blend" in config.modes and config.check_layer >= model.step.n_layers:
        raise ValueError(f"--check-layer {config.check_layer} is past the model's last layer "
                         f"{model.step.n_layers - 1}")
    int8_rows = config.int8_rows()
    labels = (["hf_full"] if config.hf else []) + [r.label for r in rows] + [f"{r.label}/int8" for r in int8_rows]
    if "full" not in config.modes:
        raise ValueError("--modes must include 'full': every quality figure is measured against it")
    stops = stop_token_ids(model.tokenizer, model.step.config)
    limit = model.step.max_positions
    per_question, skipped = [], []
    with torch.inference_mode():
        _warm_up(model, questions[0], rows, config.hf, stops)
        bar = tqdm(total=len(questions) * len(labels), desc="eval", unit="run", disable=not progress)
        prefix = None
        for index, question in enumerate(questions):
            layout = build_layout(model.tokenizer, list(question.passages), question.question, DEFAULT_SYSTEM)
            if limit and len(layout) + config.max_new_tokens > limit:
                skipped.append({"index": index, "tokens": len(layout), "context": limit})
                log.warning("question %d: %d prompt tokens + %d new exceed the model's context %d; skipped",
                            index, len(layout), config.max_new_tokens, limit)
                bar.update(len(labels))
                continue
            if prefix is None or prefix.token_ids != layout.prefix:
                prefix = compute_kv(model.step, layout.prefix)
            chunks = [compute_kv(model.step, ids, behind=prefix) for ids in layout.chunks]  # not timed
            samples: dict[str, Sample] = {}
            if config.hf:
                samples["hf_full"] = _timed_hf(model, layout.token_ids)
                bar.update()
            for row in rows:
                samples[row.label] = _timed_mode(model, layout, row, prefix, chunks, config.max_new_tokens, stops)
                bar.update()
            if int8_rows:
                prefix8, chunks8 = int8_roundtrip(prefix), [int8_roundtrip(c) for c in chunks]
                for row in int8_rows:
                    samples[f"{row.label}/int8"] = _timed_mode(model, layout, row, prefix8, chunks8,
                                                               config.max_new_tokens, stops)
                    bar.update()
            full = samples["full"]
            chunk_tokens = sum(map(len, layout.chunks))
            record = {"index": index, "question": question.question, "answers": list(question.answers),
                      "tokens": len(layout), "rows": {}}
            row_of = {r.label: r for r in rows} | {f"{r.label}/int8": r for r in int8_rows}
            for label, sample in samples.items():
                row = row_of.get(label)
                record["rows"][label] = {
                    "mode": row.mode if row else "hf_full",
                    "ratio": row.ratio if row and row.mode == "blend" else None,
                    "selector": row.selector if row and row.mode == "blend" else None,
                    "ttft_s": round(sample.ttft_s, 5),
                    "answer": sample.answer,
                    "f1_gold": (max((token_f1(sample.answer, a) for a in question.answers), default=0.0)
                                if sample.answer is not None else None),
                    "f1_vs_full": token_f1(sample.answer, full.answer) if sample.answer is not None else None,
                    "first_token_agree": float(sample.first_token == full.first_token),
                    "kl_first_token": round(kl_divergence(full.logits, sample.logits), 6),
                    "recomputed": sample.recomputed,
                    # Adaptive budgets vary per question: the share of chunk tokens actually recomputed.
                    "recompute_fraction": (round(sample.recomputed / chunk_tokens, 5)
                                           if row and row.mode in ("reuse", "blend") and chunk_tokens else None),
                }
            per_question.append(record)
        bar.close()
    if not per_question:
        raise ValueError("every question was skipped (all longer than the model's context)")
    return {"model": model.spec, "fingerprint": model.fingerprint, "dataset": str(config.dataset),
            "n": len(per_question), "skipped": skipped, "config": {**asdict(config), "dataset": str(config.dataset),
            "json_out": str(config.json_out), "plot": str(config.plot) if config.plot else None},
            "device": str(model.step.device), "torch_threads": torch.get_num_threads(),
            "rows": summarize(per_question, labels), "questions": per_question}


def run_eval(model_config: ModelConfig, config: EvalConfig) -> dict:
    questions = load_dataset(config.dataset, config.limit, config.chunks)
    model = load(model_config.spec, model_config.cache_dir, model_config.torch_dtype, model_config.device)
    report = evaluate(model, config, questions)
    print(format_table(report["rows"]))
    for skip in report["skipped"]:
        print(f"skipped question {skip['index']}: {skip['tokens']} tokens exceed the context {skip['context']}")
    config.json_out.parent.mkdir(parents=True, exist_ok=True)
    config.json_out.write_text(json.dumps(report, indent=1))
    if config.plot:
        plot(report["rows"], config.plot, f"{model.spec}, {report['n']} questions of {config.dataset.name}")
    return report
