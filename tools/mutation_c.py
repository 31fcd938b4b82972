#!/usr/bin/env python3
"""Mutation testing of the C policy engine (csrc/engine.c): the decisions the live exit path,
the QEMU shim, `policy explain` and `trace replay` all take.

    python tools/mutation_c.py                       # every mutant of csrc/engine.c
    python tools/mutation_c.py --functions kg_decide refused --show
    python tools/mutation_c.py --list                # the mutants, without testing them

mutmut mutates Python only, and no maintained C mutation tool is packaged for this host (Mull
and Dextool need a matching LLVM build), so this script plants the classic source mutations
itself, one at a time, inside the bodies of the chosen functions: a relational operator
replaced by its neighbour or negation (== != < <= > >=), && and || swapped, a `!` dropped,
+ and - swapped, & and | swapped, a `~` dropped, an `if` condition negated, a constant return flipped (0/1), an
assignment or compound assignment deleted, a `break` or `continue` deleted.  For each mutant
it rebuilds the extension in a scratch copy (--workdir) and runs the engine's tests (the ASan
harness, the engine-vs-handlers and engine-vs-documentation differential tests, explain and
replay, the KVM runs through the C loop); a mutant that fails to compile is not counted.
Prints the score (killed / tested) and every survivor.  Not in CI: about half a minute per
mutant on two cores.  Exit status 1 when the score is under --min-score.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mutation import repo_files      # tools/mutation.py: the repository's files, as git sees them

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "csrc/engine.c"
# fastest first (pytest -x stops at the first failure)
TESTS = ["tests/unit/test_engine_decide.py", "tests/unit/test_engine_table.py",
         "tests/unit/test_engine_c.py", "tests/unit/test_replay_verdicts.py",
         "tests/unit/test_policy_explain.py", "tests/differential/test_engine_verdicts.py",
         "tests/differential/test_engine_vs_handlers.py", "tests/kvm/test_engine_kvm.py",
         "tests/kvm/test_runloop_kvm.py"]
# Functions whose every mutant only changes an error text; --functions picks any explicitly.
SKIP = {"kg_strerror"}

# (pattern, replacement) per operator; each match of a pattern in a body line is one mutant
OPERATORS = [
    (r"==", "!="), (r"!=", "=="),
    (r"(?<![<>\-])<(?![<=])", "<="), (r"<=", "<"),
    (r"(?<![<>\-])>(?![>=])", ">="), (r">=", ">"),
    (r"&&", "||"), (r"\|\|", "&&"),
    (r"!(?=[\w(])", ""),
    (r"(?<=\w|\)) \+ (?=\w|\()", " - "), (r"(?<=\w|\)) - (?=\w|\()", " + "),
    (r"(?<=\w|\)) & (?=\w|\(|~)", " | "), (r"(?<=\w|\)) \| (?=\w|\()", " & "),
    (r"~(?=\w|\()", ""),
    (r"\breturn 0;", "return 1;"), (r"\breturn 1;", "return 0;"),
]
STATEMENT = re.compile(r"^\s+(?!return\b)[\w\->.\[\]*]+ (?:[|&+\-]?=) [^;]+;\s*$")
JUMP = re.compile(r"^\s+(break|continue);")
FUNC = re.compile(r"^[a-z].*\b(\w+)\(.*[^;]\s*$")


def functions(lines: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (first body line, last body line), 0-based, for top-level function definitions."""
    out, i = {}, 0
    while i < len(lines):
        m = FUNC.match(lines[i])
        if m and not lines[i].startswith(("static const uint8_t", "_Static")):
            j = i
            while j < len(lines) and not lines[j].startswith("{"):
                j += 1
            k = j + 1
            while k < len(lines) and not lines[k].startswith("}"):
                k += 1
            out[m.group(1)] = (j + 1, k - 1)
            i = k
        i += 1
    return out


def code_part(line: str) -> str:
    """The line without a trailing or whole-line comment (mutations stay out of comments)."""
    s = line.split("/*")[0].split("//")[0]
    return "" if line.lstrip().startswith("*") else s


def negated_if(line: str) -> str | None:
    """`if (c)` -> `if (!(c))` when the condition closes on the same line."""
    m = re.search(r"\bif \(", line)
    if not m:
        return None
    depth, i = 1, m.end()
    while i < len(line) and depth:
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        i += 1
    if depth:
        return None
    return line[:m.end()] + "!(" + line[m.end():i - 1] + "))" + line[i:]


def mutants(lines: list[str], names: list[str] | None) -> list[tuple[int, str, str, str]]:
    """(line number, function, mutated line, description) for every mutant."""
    out = []
    for fn, (a, b) in functions(lines).items():
        if (names and fn not in names) or (not names and fn in SKIP):
            continue
        for n in range(a, b + 1):
            line = lines[n]
            code = code_part(line)
            if not code.strip() or '"' in code or code.lstrip().startswith("#"):
                continue
            for pat, rep in OPERATORS:
                for m in re.finditer(pat, code):
                    new = line[:m.start()] + rep + line[m.end():]
                    out.append((n, fn, new, f"{m.group(0) or '!'} -> {rep or '(dropped)'}"))
            cond = negated_if(line)
            if cond is not None:
                out.append((n, fn, cond, "if condition negated"))
            if STATEMENT.match(code) or JUMP.match(code):
                out.append((n, fn, "", "statement deleted"))
    return out


def prepare(work: Path) -> None:
    for f in repo_files():
        dst = work / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)


def run(work: Path, cmd: list[str], timeout: float) -> int:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", KVMGATE_SLOW="0",
               PYTHONPATH=str(work))
    try:
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, timeout=timeout,
                              check=False).returncode
    except subprocess.TimeoutExpired:
        return -1


def test_one(work: Path, original: list[str], mutant, tests: list[str]) -> str:
    n, _fn, new, _what = mutant
    lines = list(original)
    lines[n] = new
    (work / SOURCE).write_text("\n".join(lines) + "\n")
    try:
        if run(work, [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], 300) != 0:
            return "not compiled"
        rc = run(work, [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", "--timeout=120", "--timeout-method=thread",
                        *tests], 900)
        return "survived" if rc == 0 else "killed"
    finally:
        (work / SOURCE).write_text("\n".join(original) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--functions", nargs="+", help="only these functions (default: all but "
                    f"{', '.join(sorted(SKIP))})")
    ap.add_argument("--tests", nargs="+", default=TESTS)
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--min-score", type=float, default=90.0)
    ap.add_argument("--list", action="store_true", help="print the mutants and stop")
    ap.add_argument("--show", action="store_true", help="print each survivor's line")
    a = ap.parse_args(argv)

    original = (ROOT / SOURCE).read_text().splitlines()
    todo = mutants(original, a.functions)
    if a.list:
        for n, fn, new, what in todo:
            print(f"{SOURCE}:{n + 1} {fn}: {what}: {new.strip() or '(deleted)'}")
        print(f"{len(todo)} mutants")
        return 0
    base = a.workdir or Path(tempfile.mkdtemp(prefix="kvmgate-cmutation-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    print(f"mutation testing of {SOURCE} ({len(todo)} mutants) at {commit}, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {a.jobs} jobs; "
          f"work in {base}", flush=True)
    works = []
    for j in range(a.jobs):
        w = base / f"copy{j}"
        shutil.rmtree(w, ignore_errors=True)
        prepare(w)
        works.append(w)
    # the unmutated engine must pass, or every mutant would count as killed
    if test_one(works[0], original, (0, "", original[0], ""), a.tests) != "survived":
        print("the tests fail on the unmutated engine: no score", file=sys.stderr)
        return 2
    free = list(works)
    results: list[str] = [""] * len(todo)

    def job(i: int) -> None:
        w = free.pop()
        try:
            results[i] = test_one(w, original, todo[i], a.tests)
        finally:
            free.append(w)
        n, fn, _new, what = todo[i]
        print(f"[{sum(1 for r in results if r)}/{len(todo)}] {SOURCE}:{n + 1} {fn}: {what}: "
              f"{results[i]}", flush=True)

    with ThreadPoolExecutor(a.jobs) as ex:
        list(ex.map(job, range(len(todo))))
    killed = results.count("killed")
    tested = killed + results.count("survived")
    score = 100.0 * killed / tested if tested else 0.0
    print(f"\n{SOURCE}: {killed} killed, {results.count('survived')} survived, "
          f"{results.count('not compiled')} not compiled; score {score:.1f}%")
    for (n, fn, new, what), r in zip(todo, results):
        if r == "survived":
            print(f"  survivor {SOURCE}:{n + 1} {fn}: {what}"
                  + (f"\n      - {original[n].strip()}\n      + {new.strip() or '(deleted)'}"
                     if a.show else ""))
    return 0 if tested and score >= a.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
