"""What every benchmark shares: options, the measuring method, and how results are printed.

The method (the project's standard): a figure is the median of >= 7 rounds; a comparison
against a baseline measures the two back to back in each round (interleaved pairs) on the same
guest in the same run and reports the median of the per-round ratios with their spread; the
load average is printed with every result.  Never a best round."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from ..argtypes import positive_int

MIN_ROUNDS = 7


class BenchError(Exception):
    """A benchmark cannot measure what it promises (e.g. its C baseline cannot be built)."""


def rounds_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"{text!r}: at least {MIN_ROUNDS} rounds (medians of fewer mislead)")
    return v


count_arg = positive_int            # a count of exits, rules, ... (> 0)


def cpu_arg(text: str) -> int:
    """A CPU this process may run on (sched_getaffinity)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU number") from None
    allowed = sorted(os.sched_getaffinity(0))
    if v not in allowed:
        raise argparse.ArgumentTypeError(f"CPU {v} is not one this process may use ({allowed})")
    return v


def parser(prog: str, doc: str | None, rounds: int = 9) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"kvmgate bench {prog}",
                                 description=(doc or "").strip().splitlines()[0] if doc else None)
    ap.add_argument("--rounds", type=rounds_arg, default=rounds, help=f"interleaved rounds (>= {MIN_ROUNDS})")
    ap.add_argument("--json", action="store_true")
    return ap


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def paired(rounds: int, measure: Callable[[], float], baseline: Callable[[], float],
           progress: Callable[[int, int], None] | None = None) -> dict:
    """`measure` and `baseline` back to back in each round: medians, the median of per-round
    ratios, its spread, and the load average before and after."""
    before = load_average()
    m, b = [], []
    for i in range(rounds):
        m.append(measure())
        b.append(baseline())
        if progress:
            progress(i + 1, rounds)
    ratios = sorted(x / y for x, y in zip(m, b))
    return {"rounds": rounds, "measured": statistics.median(m), "baseline": statistics.median(b),
            "ratio": statistics.median(ratios), "ratio_spread": [ratios[0], ratios[-1]],
            "load_average": [before, load_average()]}


def with_load_average(run: Callable[[], dict]) -> dict:
    """run()'s result with "load_average": [before, after] (for benchmarks that interleave
    their rounds themselves)."""
    before = load_average()
    res = run()
    res["load_average"] = [before, load_average()]
    return res


def median_of(rounds: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(rounds))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def emit(result: dict, as_json: bool, rows: list[tuple[str, str]]) -> None:
    if as_json:
        print(json.dumps(result))
        return
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")


def load_row(result: dict) -> tuple[str, str]:
    before, after = result["load_average"]
    return ("load average (1/5/15 min)", f"{before} before, {after} after")
