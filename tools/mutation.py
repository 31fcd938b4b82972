#!/usr/bin/env python3
"""Mutation testing of kvmgate's pure decision logic with mutmut 3, against the fast tests.

    python tools/mutation.py                      # the default modules, tests/unit
    python tools/mutation.py kvmgate/audit.py     # one module
    python tools/mutation.py --show               # also print each survivor's diff

mutmut plants one small bug at a time (an operator, a constant, a condition, a dropped
call...) in the modules below and runs the unit tests that cover the mutated function; a
mutant no test notices "survives".  The work happens in a scratch copy of the repository
(--workdir, default a temporary directory), so the worktree is never touched; re-running with
the same --workdir reuses the copy but re-tests every mutant (mutmut's cache does not notice
every change, e.g. edited tests).  Prints the score per module and overall
(killed / (killed + survived); mutants no test reaches count as survivors) and lists every
survivor.  Exit status 1 when the overall score is under --min-score.

It is not part of CI: a full run takes tens of minutes on two cores.  Needs `pip install
mutmut` (>= 3).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The pure decision logic: the filter model, the policy compiler and its action semantics,
# audit rate limiting, trace replay verdicts, introspection permissions and codecs.  (The
# policy parser, kvmgate/policy/parse.py, is mostly error messages: 1080 mutants, run it alone.)
MODULES = [
    "kvmgate/msr/model.py",
    "kvmgate/policy/compile.py",
    "kvmgate/policy/handlers.py",
    "kvmgate/audit.py",
    "kvmgate/engine/verdict.py",
    "kvmgate/introspection/permissions.py",
    "kvmgate/introspection/protocol.py",
]
TESTS = ["tests/unit"]
# Unit test files that exercise none of MODULES directly and are slow (subprocess CLI runs,
# big traces, AST walks, fuzz streams); --all-tests runs them too.
SLOW_TESTS = ["tests/unit/test_cli_trace.py", "tests/unit/test_trace.py", "tests/unit/test_learn.py",
              "tests/unit/test_layers.py", "tests/unit/test_names.py",
              "tests/unit/test_introspection_fuzz.py",
              # compile and run the C engine/run loop under ASan: no Python module of MODULES
              "tests/unit/test_engine_c.py", "tests/unit/test_runloop_c.py"]
MUTATION_EXAMPLES = 30        # hypothesis examples per property test while mutating

KILLED = {"killed", "timeout", "caught by type check"}
NOT_COUNTED = {"skipped", "not checked"}


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def prepare(work: Path, modules: list[str], tests: list[str], ignore: list[str]) -> None:
    """Copy the repository into `work` (keeping mutmut's state there) and configure mutmut."""
    work.mkdir(parents=True, exist_ok=True)
    for f in repo_files():
        dst = work / f
        src = ROOT / f
        if dst.exists() and dst.read_bytes() == src.read_bytes():
            continue                       # unchanged: mutmut keeps its cached results
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    # the C engine extension (untracked, so not copied): the engine-backed tests need it, and
    # mutmut copies kvmgate/ with whatever is in it into mutants/
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=work,
                   check=True, capture_output=True)
    # mutmut reads [tool.mutmut] from pyproject.toml, else [mutmut] from setup.cfg
    cfg = ["[mutmut]", "source_paths = kvmgate", "only_mutate ="]
    cfg += [f"    {m}" for m in modules]
    cfg += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    cfg += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -q"]
    cfg += [f"    --ignore={t}" for t in ignore]
    # tests that read files outside kvmgate/ and tests/ (the MSR-name generator, the C headers, the docs
    # that citations must resolve to) need them in mutmut's copy too
    cfg += ["also_copy =", "    tools", "    docs", "    csrc"]
    cfg += ["timeout_multiplier = 10.0", "timeout_constant = 20.0", ""]
    (work / "setup.cfg").write_text("\n".join(cfg))
    # mutmut 3 keeps mutants and verdicts in mutants/ and does not notice every change (a new
    # module list, edited tests): start from scratch each time
    shutil.rmtree(work / "mutants", ignore_errors=True)
    # fewer hypothesis examples per property (still derandomized): in the scratch copy only
    with open(work / "tests" / "conftest.py", "a") as f:
        f.write(f"\n\nsettings.register_profile('mutation', parent=settings.get_profile('ci'), "
                f"max_examples={MUTATION_EXAMPLES})\nsettings.load_profile('mutation')\n")


def mutmut(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", KVMGATE_SLOW="0")
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, env=env, text=True,
                          capture_output=True, check=check)


def module_of(mutant: str) -> str:
    """kvmgate.msr.model.x_MsrFilter__validate__mutmut_3 -> kvmgate/msr/model.py"""
    dotted = mutant.split(".x")[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]
    return dotted.replace(".", "/") + ".py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", default=MODULES, help="files to mutate")
    ap.add_argument("--tests", nargs="+", default=TESTS, help="test paths to run")
    ap.add_argument("--all-tests", action="store_true", help=f"do not skip {', '.join(SLOW_TESTS)}")
    ap.add_argument("--workdir", type=Path, help="scratch copy (kept; reused to resume)")
    ap.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--min-score", type=float, default=90.0)
    ap.add_argument("--show", action="store_true", help="print each survivor's diff")
    a = ap.parse_args(argv)

    work = a.workdir or Path(tempfile.mkdtemp(prefix="kvmgate-mutation-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "kvmgate", "tests"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    print(f"mutation testing of {len(a.modules)} modules against {' '.join(a.tests)} "
          f"at {commit}{' (+ uncommitted changes)' if dirty else ''}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; work in {work}",
          flush=True)
    prepare(work, a.modules, a.tests, [] if a.all_tests else SLOW_TESTS)
    run = mutmut(work, "run", "--max-children", str(a.max_children), check=False)
    if run.returncode not in (0, 1):
        sys.stdout.write(run.stdout[-4000:])
        sys.stderr.write(run.stderr[-4000:])
        print(f"mutmut run failed with status {run.returncode}", file=sys.stderr)
        return 2
    res = mutmut(work, "results", "--all", "true").stdout
    status: dict[str, str] = {}
    for line in res.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    per = collections.defaultdict(collections.Counter)
    for name, st in status.items():
        per[module_of(name)][st] += 1
    total_k = total_n = 0
    print(f"\n{'module':40} {'killed':>7} {'survived':>9} {'no tests':>9} {'score':>7}")
    for mod in sorted(per):
        c = per[mod]
        k = sum(c[s] for s in KILLED)
        n = sum(v for s, v in c.items() if s not in NOT_COUNTED)
        total_k, total_n = total_k + k, total_n + n
        print(f"{mod:40} {k:7} {c['survived']:9} {c['no tests']:9} "
              f"{100.0 * k / n if n else 100.0:6.1f}%")
    unchecked = sum(c["not checked"] for c in per.values())
    if total_n == 0 or unchecked:
        # a run that tested nothing is a broken run (e.g. the test suite failed to collect in
        # mutmut's copy), never a perfect score
        sys.stdout.write(run.stdout[-4000:])
        print(f"mutmut tested {total_n} mutants and left {unchecked} unchecked: the run is "
              f"broken, no score", file=sys.stderr)
        return 2
    score = 100.0 * total_k / total_n
    print(f"{'overall':40} {total_k:7} {total_n - total_k:>9} {'':9} {score:6.1f}%")
    survivors = sorted(n for n, st in status.items() if st not in KILLED | NOT_COUNTED)
    if survivors:
        print(f"\n{len(survivors)} survivors (python -m mutmut show NAME in {work}):")
        for name in survivors:
            print(f"  {name}: {status[name]}")
            if a.show:
                diff = mutmut(work, "show", name, check=False).stdout
                print("\n".join("      " + line for line in diff.splitlines()[1:]))
    return 0 if score >= a.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
