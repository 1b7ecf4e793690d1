"""Probe (not a result): what a served request with new inline documents gains when the chunks it computes are
written to the store after its first token (`Engine.write_behind`, the default) instead of before its prefill.

One engine (the embedded SmolLM2 unless --model, on this machine's device, its default store: a CPU tier over a
disk tier in a temporary data dir); each round asks one question with `--documents` passages never seen before
(each made unique by a round tag), once with the writes behind and once before (which goes first alternates),
and reads the server-side TTFT from each answer's first message. Prints the median TTFT of each and their ratio.
Run: PYTHONPATH=. python3 -m services.bench.probe_writeback [--rounds 6] [--documents 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from services.serving.engine import Engine
from services.serving.requests import DocumentIn, GenerateParams
from services.settings import build


def passage(round_: int, index: int) -> DocumentIn:
    text = " ".join(f"In round {round_}, note {index}.{i} says the river {i} runs past town {index * 7 + i} and "
                    f"its bridge {i} was built in year {1800 + round_ * 10 + i}." for i in range(14))
    return DocumentIn(text, f"Note {round_}.{index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        settings = build({"server": {"max_inline_documents": max(16, args.documents)}},
                         {"data_dir": data_dir, "spec": args.model, "device": args.device})
        engine = Engine.open(settings)
        try:
            ttft: dict[bool, list[float]] = {True: [], False: []}
            tokens: dict[bool, list[int]] = {True: [], False: []}
            chunks = 0
            for round_ in range(-1, args.rounds):  # round -1 warms both paths and is not counted
                for behind in ((True, False) if round_ % 2 == 0 else (False, True)):
                    engine.write_behind = behind
                    docs = tuple(passage(2 * round_ + behind + 10, i) for i in range(args.documents))
                    pieces = list(engine.generate("probe", GenerateParams(query="Which bridge is oldest?",
                                                                          documents=docs, max_new_tokens=2)))
                    report = pieces[0].report
                    assert report.chunks_missing == len(report.chunk_ids), "a passage was not new"
                    engine.flush_writes(120)
                    if round_ >= 0:
                        ttft[behind].append(pieces[0].ttft_s)
                        tokens[behind].append(report.prompt_tokens)
                        chunks = len(report.chunk_ids)
        finally:
            engine.close()
    behind, before = statistics.median(ttft[True]), statistics.median(ttft[False])
    print(json.dumps({"device": str(engine.model.step.device), "rounds": args.rounds, "documents": args.documents,
                      "chunks": chunks, "prompt_tokens": statistics.median(tokens[True]),
                      "ttft_s_writes_behind": [round(t, 4) for t in ttft[True]],
                      "ttft_s_writes_before": [round(t, 4) for t in ttft[False]]}, indent=1))
    print(f"server TTFT, {args.documents} new inline documents ({chunks} chunks), median of {args.rounds}: writes after the first "
          f"token {1000 * behind:.1f} ms, before the prefill {1000 * before:.1f} ms: {before / behind:.3f}x")


if __name__ == "__main__":
    main()
