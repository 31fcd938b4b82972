"""The CLI imports only the command group named on the command line (kvmgate.cli.build_parser),
and a closed stdout ends a command quietly."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from kvmgate.cli import COMMAND_GROUP, GROUPS, build_parser


def commands(ap: argparse.ArgumentParser) -> set[str]:
    [sub] = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_every_command_is_found_through_its_group():
    every = commands(build_parser())
    assert {"run", "policy", "trace", "wrap", "info", "reload"} <= every
    for name in every:
        assert name in GROUPS or name in COMMAND_GROUP, name
        assert name in commands(build_parser([name, "--help"]))
        assert len(commands(build_parser([name]))) < len(every)


def test_unknown_or_missing_command_builds_every_group():
    every = commands(build_parser())
    assert commands(build_parser(["bogus"])) == every
    assert commands(build_parser(["--help"])) == every
    assert commands(build_parser([])) == every


def test_policy_check_does_not_load_pyarrow():
    code = ("import sys; from kvmgate.cli import build_parser; build_parser(['policy']); "
            "print(sorted(m for m in ('pyarrow', 'numpy', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_closed_stdout_ends_quietly():
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run([sys.executable, "-m", "kvmgate", "schema", "audit"], stdout=w,
                       stderr=subprocess.PIPE, text=True)
    os.close(w)
    assert p.returncode == 141
    assert p.stderr == ""
