#!/usr/bin/env python3
"""Trace replay throughput from a Parquet file vs DuckDB (see kvmgate/bench/replay.py).

    python3 bench/trace_replay.py [--events 20000000] [--rounds 7] [--json]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmgate.bench.replay import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
