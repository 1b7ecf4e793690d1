"""`kvblend eval`: metrics, input errors, and one small real run on SmolLM2."""

import json
import subprocess
import sys

import pytest

from blend.fusor import BlendConfig
from blend.quality import kl_divergence
from services.bench.evaluate import EvalConfig, evaluate, load_dataset, selector_curves, token_f1


def test_token_f1_uses_squad_normalisation():
    assert token_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("London", "Paris") == 0.0


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    import torch

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(logits, logits.flip(0)) > 0.01


@pytest.mark.parametrize(
    "content,message",
    [
        ([], "holds no questions"),
        ([{"question": "q?", "answers": ["a"], "ctxs": []}], "item 0 .* has no passages"),
        ([{"answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}], "item 0 has no 'question'"),
    ],
)
def test_bad_datasets_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_missing_dataset_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_dataset(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "flag,value,message",
    [("--modes", "full,turbo", "unknown mode 'turbo'"), ("--ratios", "0.1,1.5", "ratio 1.5"),
     ("--ratios", "x", "ratio 'x'"), ("--selector", "q", "unknown selector 'q'"),
     ("--selector", "k,qattn+sink", "unknown option 'sink' in selector 'qattn+sink'")],
)
def test_bad_eval_flags_are_one_clear_error(tmp_path, flag, value, message):
    result = subprocess.run(
        [sys.executable, "-m", "services.commands.cli", "eval", "--dataset", str(tmp_path / "d.json"),
         "--json", str(tmp_path / "o.json"), flag, value],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.model
def test_small_real_eval_reports_every_row_and_skips_an_overlong_question(smol, tmp_path):
    short = {"question": "Who wrote Hamlet?", "answers": ["William Shakespeare"],
             "ctxs": [{"title": "Hamlet", "text": "Hamlet is a tragedy written by William Shakespeare."},
                      {"title": "Macbeth", "text": "Macbeth is another play by Shakespeare, set in Scotland."}]}
    overlong = {"question": "What is this?", "answers": ["words"],
                "ctxs": [{"title": "Long", "text": "word " * 9000}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([overlong, short]))
    config = EvalConfig(dataset=path, json_out=tmp_path / "out.json", modes=("full", "reuse", "blend"),
                        ratios=(0.3, 1.0), max_new_tokens=6, kv_int8=True)
    report = evaluate(smol, config, load_dataset(path), progress=False)
    assert report["n"] == 1 and report["skipped"][0]["index"] == 0
    rows = {row["label"]: row for row in report["rows"]}
    selector = BlendConfig.selector  # the default, as `kvblend eval` uses it
    assert set(rows) == {"hf_full", "full", "reuse", f"blend@0.3/{selector}", f"blend@1/{selector}", "reuse/int8",
                         f"blend@0.3/{selector}/int8"}
    # int8 K/V is close to, not equal to, the float K/V: a small but non-zero change in the answer logits.
    assert 0 < abs(rows["reuse/int8"]["kl_first_token"] - rows["reuse"]["kl_first_token"]) < 0.05
    assert rows[f"blend@1/{selector}"]["kl_first_token"] < 1e-6 and rows[f"blend@1/{selector}"]["f1_vs_full"] == 1.0
    assert rows["hf_full"]["kl_first_token"] < 1e-6
    assert all(row["ttft_median_s"] > 0 for row in rows.values())
    assert rows["reuse"]["recompute_fraction"] == 0.0 and rows["full"]["recompute_fraction"] is None
    assert rows[f"blend@0.3/{selector}"]["recompute_fraction"] == pytest.approx(0.3, abs=0.02)
    assert rows[f"blend@1/{selector}"]["recompute_fraction"] == 1.0


def test_query_aware_selectors_get_one_row_per_ratio_below_one():
    config = EvalConfig(dataset="d.json", json_out="o.json", modes=("full", "reuse", "blend"), ratios=(0.15, 1.0),
                        selectors=("qattn+sink4", "k", "k*qattn+cover0.9"), gradual_layers=2)
    assert [row.label for row in config.rows()] == [
        "full", "reuse", "blend@0.15/qattn+sink4", "blend@1/qattn+sink4", "blend@0.15/k",
        "blend@0.15/k*qattn+cover0.9", "blend@0.15/qattn+sink4/gradual2"]


def test_selector_curves_compare_at_equal_recompute_and_start_at_reuse():
    def row(label, mode, kl, fraction):
        return {"label": label, "mode": mode, "kl_first_token": kl, "recompute_fraction": fraction}

    rows = [row("full", "full", 0.0, None), row("reuse", "reuse", 0.24, 0.0), row("reuse/int8", "reuse", 0.25, 0.0),
            row("blend@0.15/k", "blend", 0.15, 0.15), row("blend@0.05/k", "blend", 0.19, 0.05),
            row("blend@0.15/qattn+cover0.9", "blend", 0.09, 0.11), row("blend@0.05/k/int8", "blend", 0.2, 0.05)]
    curves = selector_curves(rows)
    assert curves == {"k": [(0.0, 0.24), (0.05, 0.19), (0.15, 0.15)], "qattn+cover0.9": [(0.0, 0.24), (0.11, 0.09)],
                      "k/int8": [(0.0, 0.25), (0.05, 0.2)]}
