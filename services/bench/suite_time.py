"""The CPU suite's time, a base commit against the head, measured back to back on this machine (issue 16: "no
change in CPU test time beyond 10%"). Each of two checkouts (`make setup` done in each) runs `make test` in
turn, the order alternating pair by pair so a drift of the machine's load hits both alike; pytest reports
every test's time (`--durations=0`). Printed per pair: both suites' wall time, and the time of the tests
the two share against the time of the tests only the head has (and of those only the base has): on a shared
2-core machine whole-suite times swing by 10% and more between back-to-back runs of the same code, while the
new tests' own time is what the head adds.

`python3 -m services.bench.suite_time /tmp/base /tmp/head --pairs 3` (e.g. `git clone . /tmp/base && git -C
/tmp/base checkout BASE && make -C /tmp/base setup`, the same for the head).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

DURATION = re.compile(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(\S+)")


def run_suite(checkout: Path) -> tuple[float, dict[str, float], str]:
    """(wall seconds, test id -> seconds, pytest's last line) of one `make test` in `checkout`."""
    env = dict(os.environ, PYTEST_ADDOPTS="--durations=0 -p no:cacheprovider")
    started = time.perf_counter()
    done = subprocess.run(["make", "test"], cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = done.stdout.splitlines()
    if done.returncode != 0:
        raise RuntimeError(f"make test failed in {checkout} (exit {done.returncode}): {lines[-1:] or done.stderr[-500:]}")
    tests: dict[str, float] = defaultdict(float)
    for line in lines:
        match = DURATION.match(line)
        if match:
            tests[match.group(2)] += float(match.group(1))
    return wall, dict(tests), lines[-1] if lines else ""


def movers(base: dict[str, float], head: dict[str, float], count: int = 12) -> list[tuple[str, float, float]]:
    """The `count` tests whose time grew most from base to head ((test, base s, head s); a test only the head has
    counts from 0 s): where a slower head's time went."""
    grown = sorted(head, key=lambda test: base.get(test, 0.0) - head[test])[:count]
    return [(test, round(base.get(test, 0.0), 2), round(head[test], 2)) for test in grown]


def compare(base: dict[str, float], head: dict[str, float]) -> dict:
    shared = set(base) & set(head)
    return {"shared_tests": len(shared), "shared_base_s": round(sum(base[t] for t in shared), 1),
            "shared_head_s": round(sum(head[t] for t in shared), 1),
            "head_only_tests": len(set(head) - shared), "head_only_s": round(sum(head[t] for t in set(head) - shared), 1),
            "base_only_tests": len(set(base) - shared), "base_only_s": round(sum(base[t] for t in set(base) - shared), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("head", type=Path)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for checkout in (args.base, args.head):
        if not (checkout / "Makefile").is_file():
            raise SystemExit(f"{checkout} is not a checkout with a Makefile")
    commits = {name: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                                    text=True).stdout.strip() for name, path in (("base", args.base), ("head", args.head))}
    print(f"base {commits['base']} ({args.base}), head {commits['head']} ({args.head}), {args.pairs} pairs")
    pairs = []
    for index in range(args.pairs):
        order = ("base", "head") if index % 2 == 0 else ("head", "base")
        runs = {}
        for name in order:
            runs[name] = run_suite(args.base if name == "base" else args.head)
        (base_wall, base_tests, base_last), (head_wall, head_tests, head_last) = runs["base"], runs["head"]
        pair = {"order": list(order), "base_wall_s": round(base_wall, 1), "head_wall_s": round(head_wall, 1),
                "head_over_base": round(head_wall / base_wall, 3), "base_result": base_last, "head_result": head_last,
                **compare(base_tests, head_tests), "grew_most": movers(base_tests, head_tests)}
        pairs.append(pair)
        print(f"pair {index + 1} ({' then '.join(order)}): wall base {pair['base_wall_s']} s, head {pair['head_wall_s']} s "
              f"({pair['head_over_base']:.3f}x); tests in both {pair['shared_base_s']} s -> {pair['shared_head_s']} s; "
              f"only the head's {pair['head_only_tests']} tests {pair['head_only_s']} s; only the base's "
              f"{pair['base_only_tests']} tests {pair['base_only_s']} s")
        print("  grew most (base s -> head s): " + "; ".join(f"{test} {was} -> {now}" for test, was, now in pair["grew_most"]))
    walls = {name: statistics.mean(p[f"{name}_wall_s"] for p in pairs) for name in ("base", "head")}
    added = statistics.median(p["head_only_s"] - p["base_only_s"] for p in pairs)
    summary = {"base_mean_wall_s": round(walls["base"], 1), "head_mean_wall_s": round(walls["head"], 1),
               "mean_wall_ratio": round(walls["head"] / walls["base"], 3),
               "median_pair_ratio": round(statistics.median(p["head_over_base"] for p in pairs), 3),
               "added_tests_net_s": round(added, 1), "added_over_base_mean": round(added / walls["base"], 3)}
    print(f"mean wall: base {summary['base_mean_wall_s']} s, head {summary['head_mean_wall_s']} s "
          f"({summary['mean_wall_ratio']:.3f}x; median pair {summary['median_pair_ratio']:.3f}x); the head's own tests "
          f"less the base's: {summary['added_tests_net_s']} s a run (median), {100 * summary['added_over_base_mean']:.1f}% "
          f"of the base's mean wall")
    if args.json:
        args.json.write_text(json.dumps({"commits": commits, "pairs": pairs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
