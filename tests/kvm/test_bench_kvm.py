"""Benchmarks' home: the registry, the C baseline shipped as package data and built without
leftovers, and a benchmark that cannot build its baseline saying so (exit 1)."""
import json
import os
import subprocess
import sys
from importlib import resources

import pytest

from kvmgate.engine import binding

from kvmgate import bench
from kvmgate.bench.cbaseline import c_loop
from kvmgate.bench.common import BenchError


def run_bench(tmp_path, *args, env=None):
    e = dict(os.environ, TMPDIR=str(tmp_path), **(env or {}))
    return subprocess.run([sys.executable, "-m", "kvmgate", "bench", *args], capture_output=True,
                          text=True, timeout=600, env=e, check=False)


def test_registry_and_package_data():
    assert {"exits", "policy", "vcpus", "runloop", "replay", "wrap", "introspect",
            "wrap-introspect"} == set(bench.BENCHES)
    assert resources.files("kvmgate.bench").joinpath("exit_loop.c").is_file()


def test_exits_bench_reports_paired_medians_and_leaves_no_temp_dirs(tmp_path):
    r = run_bench(tmp_path, "exits", "-n", "2000", "--rounds", "7", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rounds"] == 7 and res["c_us"] > 0 and res["python_us"] > 0
    lo, hi = res["ratio_spread"]
    assert lo <= res["ratio"] <= hi and len(res["load_average"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_policy_bench_has_compile_figures(tmp_path):
    r = run_bench(tmp_path, "policy", "-n", "2000", "--rounds", "7", "--rules", "200",
                  "--wide-rules", "100", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["wide_rules"] == 100 and res["compile_wide_rules_s"] > 0
    assert res["compile_one_wide_rule_s"] > 0 and res["ratio"] > 0


def test_bench_without_baseline_says_so(tmp_path):
    r = run_bench(tmp_path, "exits", "-n", "1000", "--rounds", "7", env={"CC": "false"})
    assert r.returncode == 1 and "cannot build the C baseline" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_c_loop_error_in_process(monkeypatch):
    c_loop.cache_clear()
    monkeypatch.setenv("CC", "false")
    try:
        with pytest.raises(BenchError, match="cannot build the C baseline"):
            c_loop()
    finally:
        c_loop.cache_clear()


def test_introspect_bench_pinned_runs_every_path_on_that_cpu(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    r = run_bench(tmp_path, "introspect", "-n", "50", "--rounds", "7", "--pin-cpu", str(cpu), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["pinned_cpu"] == cpu and res["events"]["event"] == 50
    bad = run_bench(tmp_path, "introspect", "--pin-cpu", "100000")
    assert bad.returncode == 2 and "--pin-cpu" in bad.stderr and "Traceback" not in bad.stderr


def test_introspect_bench_reports_every_path_and_the_load(tmp_path):
    """`kvmgate bench introspect`: every write of every round made the exit it should (an MSR
    event per write with the event enabled, none with it off), medians and the load average."""
    r = run_bench(tmp_path, "introspect", "-n", "200", "--rounds", "7", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rounds"] == 7 and res["writes"] == 200
    assert res["events"] == {"event": 200, "event_py": 200, "event_v7": 200, "event_sleep": 200,
                             "quiet": 0}
    assert res["exits"] == {"exit": 200, "event": 200, "event_py": 200, "event_v7": 200,
                            "event_sleep": 200, "quiet": 200}
    assert all(res[k + "_us"] > 0 for k in ("native", "exit", "exit_bare", "event", "event_py",
                                            "event_v7", "event_sleep", "quiet", "c_exit",
                                            "c_event", "c_event_sleep"))
    assert res["floor_ratio"] > 0 and res["floor_sleep_ratio"] > 0
    assert res["ratio_py"] > 0 and res["ratio_c"] > 0
    assert res["c_path"] is binding.available()       # `event` ran on the C event path
    assert "pinned_cpu" not in res
    assert len(res["load_average"]) == 2 and all(len(x) == 3 for x in res["load_average"])
