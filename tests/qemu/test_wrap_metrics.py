"""`kvmgate wrap --metrics-port/--metrics-file` on a real QEMU: the decision counters (fed from
the shim's shared-memory counts and the drained audit rings) rise while the VM runs, exits and
reloads are counted, and the node_exporter textfile is written whole (renamed into place)."""
from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvmgate.wrap import pvhguest
from tests.qemu import procs

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
MSR = 0x40001234
RULE = ('[policy]\ndefault = "allow"\n[[rule]]\nmsr = 0x40001234\naccess = "read"\n'
        'action = "constant"\nlog = {log}\nvalue = {value}\n')


class Lines:
    """Lines of a child's stdout and stderr, read by two threads (no pipe fills up)."""

    def __init__(self, proc):
        self.q: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        for name in ("stdout", "stderr"):
            threading.Thread(target=self._pump, args=(name, getattr(proc, name)), daemon=True).start()

    def _pump(self, name, stream):
        for line in stream:
            self.q.put((name, line))
        self.q.put((name, None))

    def wait(self, name: str, pattern: str) -> str:
        while True:
            try:
                src, line = self.q.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"{pattern!r} never came: {''.join(self.seen)}") from None
            if line is not None:
                self.seen.append(line)
            if src == name and line is not None and re.search(pattern, line):
                return line


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def decisions(s: dict) -> float:
    return sum(v for (name, labels), v in s.items()
               if name == "kvmgate_decisions_total" and dict(labels)["msr"] == f"{MSR:#x}")


def scrape(url: str) -> dict:
    return samples(urllib.request.urlopen(url, timeout=30).read().decode())


def _run_scraped(tmp_path, log: str):
    """The guest reads MSR until it sees 2; the policy answers 1, so it spins (and the counters
    rise) until SIGHUP installs value 2."""
    elf = pvhguest.build([(MSR, 0, 0)], tmp_path, vcpus=1, wait=2)
    pol = tmp_path / "p.toml"
    pol.write_text(RULE.format(log=log, value=1))
    prom = tmp_path / "prom" / "kvmgate.prom"
    prom.parent.mkdir()
    proc = procs.start([sys.executable, "-m", "kvmgate", "wrap", "--policy", str(pol),
                        "--metrics-port", "0", "--metrics-file", str(prom), "--json", "--"]
                       + pvhguest.qemu_argv(elf, 1), cwd=ROOT, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = Lines(proc)
    try:
        url = re.search(r"(http://\S+/metrics)", lines.wait("stderr", "metrics on")).group(1)
        lines.wait("stderr", "active in VMM")
        lines.wait("stdout", r"^W")                              # the guest spins on 1
        first = scrape(url)
        while decisions(first) == 0:           # logged ones arrive with the next ring drain
            first = scrape(url)
        second = first
        while decisions(second) <= decisions(first):              # it keeps reading: they rise
            second = scrape(url)
        pol.write_text(RULE.format(log=log, value=2))
        proc.send_signal(signal.SIGHUP)
        lines.wait("stderr", "kvmgate: reloaded")
        proc.wait(timeout=TIMEOUT)
    finally:
        procs.kill_group(proc)
    assert proc.returncode == pvhguest.EXIT_OK, "".join(lines.seen)
    return first, second, prom


def _check(first, second, prom):
    assert decisions(first) > 0 and decisions(second) > decisions(first)
    assert second[("kvmgate_exits_total", (("vcpu", "0"),))] >= decisions(second)
    final = samples(prom.read_text())
    assert [p.name for p in prom.parent.iterdir()] == [prom.name]        # renamed into place
    assert decisions(final) >= decisions(second)
    assert final[("kvmgate_reloads_total", (("outcome", "applied"),))] == 1
    key = ("kvmgate_decisions_total", (("access", "read"), ("action", "constant"),
                                       ("msr", f"{MSR:#x}"), ("name", "MSR_0x40001234"),
                                       ("result", "read 0x1")))
    assert key in final and final[key] >= decisions(second)
    return final


def test_counted_decisions_rise_between_scrapes(tmp_path):
    """log = false: the shim counts the decisions in shared memory (no ring records)."""
    final = _check(*_run_scraped(tmp_path, "false"))
    assert final[("kvmgate_audit_records_total", ())] == 0


def test_logged_decisions_rise_between_scrapes(tmp_path):
    """log = true: the decisions come through the audit rings, rate limited."""
    final = _check(*_run_scraped(tmp_path, "true"))
    assert final[("kvmgate_audit_records_total", ())] > 0
    assert final[("kvmgate_audit_suppressed_total", ())] > 0
