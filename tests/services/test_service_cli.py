"""The command lines: `kvblend query` prints the streamed answer and the report; `kvblend demo` runs
a server, ingests, answers one question and stops it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.service import DOCUMENTS

from services.commands import cli

ROOT = Path(__file__).resolve().parents[2]


def test_query_prints_the_answer_then_the_report(plain_server, capsys):
    with plain_server.client() as client:
        client.wait_ready(30)
        ids = [d.chunk_ids[0] for d in client.ingest(DOCUMENTS[:2]).documents]
    args = ["query", "--server", plain_server.target, "--query", "Where does the Seine flow?",
            "--chunk-ids", *ids, "--mode", "blend", "--ratio", "0.3", "--max-new-tokens", "3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "mode        blend@0.3; 2 chunks" in out and "finish      length: 3 tokens" in out
    assert "chunk ids   " + " ".join(ids) in out
    assert cli.main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["report"]["chunk_ids"] == ids and len(record["token_ids"]) == 3


def test_query_reports_a_refusal_with_its_status(plain_server, capsys):
    assert cli.main(["query", "--server", plain_server.target, "--query", "x",
                            "--chunk-ids", "0000000000000000"]) == 1
    assert "NOT_FOUND: unknown chunk id '0000000000000000'" in capsys.readouterr().err


def test_demo_serves_ingests_answers_and_stops(service_model_dir, tmp_path, capsys):
    dataset = tmp_path / "musique.json"
    dataset.write_text(json.dumps([{"question": "Where does the Seine flow?", "answers": ["Paris"],
                                    "ctxs": [{"title": d["title"], "text": d["text"]} for d in DOCUMENTS]}]))
    assert cli.main(["demo", "--dataset", str(dataset), "--model", str(service_model_dir),
                      "--questions", "1", "--top-k", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "ingesting 4 passages of 1 questions" in out and "Q: Where does the Seine flow?" in out
    assert "gold: Paris" in out and "mode        blend@0.15; 2 chunks" in out
    assert "server exited with status 0" in out


def test_ingest_to_a_server_refuses_flags_that_only_apply_locally(capsys):
    dataset = str(ROOT / "data" / "musique_sample.json")
    assert cli.main(["ingest", "--server", "127.0.0.1:1", "--dataset", dataset, "--no-kv", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "--no-kv, --threads apply to a local ingest, not to --server 127.0.0.1:1" in err
