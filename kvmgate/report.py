"""Tables for people, JSON for programs."""
from __future__ import annotations

import json
import sys


def table(rows: list[dict], columns: list[str] | None = None, out=None) -> None:
    out = out or sys.stdout
    if not rows:
        print("(nothing)", file=out)
        return
    cols = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def emit(data, as_json: bool, columns: list[str] | None = None) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    elif isinstance(data, list):
        table(data, columns)
    else:
        for k, v in data.items():
            print(f"{k}: {v}")
