"""`kvblend bench-novel` end to end on the tiny model: a real server, a few queries, windows of two."""

from __future__ import annotations

import json
from pathlib import Path

from services.commands.cli import main
from tests.helpers.model import CACHE_DIR

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "musique_sample.json"


def test_bench_novel_reports_hit_rate_and_both_ttfts_per_window(service_model_dir, tmp_path, capsys):
    out = tmp_path / "novel.json"
    code = main(["bench-novel", "--dataset", str(SAMPLE), "--model", str(service_model_dir),
                 "--cache-dir", str(CACHE_DIR), "--queries", "4", "--window", "2", "--novel", "2",
                 "--popular", "1", "--popular-pool", "2", "--chunk-tokens", "32", "--cpu-bytes", str(1 << 20),
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cpu hit" in printed and "speed-up, last window / first" in printed
    result = json.loads(out.read_text())["result"]
    windows = result["windows"]
    assert [w["queries"] for w in windows] == [2, 2]
    for w in windows:
        assert 0.0 <= w["cpu_hit_rate"] <= 1.0
        assert w["blend_ttft_p50_s"] > 0 and w["full_ttft_p50_s"] > 0 and w["speedup"] > 0
        # 3 chunks per blend request, each loaded from a tier or computed; the popular chunk, warmed
        # twice, is admitted to the CPU tier, and the novel ones (one use each) are not.
        assert w["chunks_loaded"] == 2 * 3
        assert w["chunks_hit"].get("cpu", 0) >= 1
    pairs = result["pairs"]
    assert len(pairs) == 4 and all(set(p) == {"blend", "full"} for p in pairs)
    assert result["last_over_first_speedup"] == windows[-1]["speedup"] / windows[0]["speedup"]
