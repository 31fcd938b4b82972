"""`kvmgate wrap`: run an unmodified VMM (QEMU) with the shim preloaded, under a policy.

The parent (this module) compiles the policy (kvmgate.policy, the same compiler and range
planner as `kvmgate run`) into the kernel filter, exit mask and engine table
(kvmgate.engine.build_table), writes them into the shared memory's mailbox (kvmgate.wrap.layout),
and starts the VMM with LD_PRELOAD=shim and KVMGATE_SHIM=MEMFD:CTL:STATUS.  Inside the VMM the
shim installs the policy at KVM_CREATE_VM (or refuses the VM), answers the policy's MSR exits
through the engine and pushes one record per decision into its vCPU's ring; the parent drains
the rings into kvmgate.audit.AuditLog (the VMM never waits for the disk), reloads the policy on
request (mailbox + 'R' on the control pipe; the shim answers on the status pipe) and returns
the VMM's exit code.

Wrap is made of: this module (policy, mailbox, rings, counters, reload, wait), process.py
(VmmChannel: shared memory, pipes, starting or exec'ing the VMM, the shim's status lines),
tool.py (IntrospectOptions, ToolHookup: an introspection tool, --introspect) and result.py
(WrapResult, report, as_json).
"""
from __future__ import annotations

import ctypes as C
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..audit import AuditLog
from ..engine import Ring, build_table, decode
from ..engine.ring import RECORD
from ..errors import UserError
from ..hostinfo import ignore_msrs
from ..policy import Policy, compile_policy, load_policy
from . import counters, layout
from .library import shim_path
from .process import VmmChannel
from .result import WrapResult, as_json, report
from .tool import IntrospectOptions, ToolHookup

DRAIN_PERIOD = 0.05          # seconds between ring drains while the VMM runs
RELOAD_TIMEOUT = 30.0


def _read_value(result: str) -> int:
    """The value of a "read 0x.." result text; 0 otherwise."""
    return int(result.split()[1], 16) if result.startswith("read ") else 0


def allow_all_policy() -> Policy:
    """What `kvmgate wrap` without --policy installs: nothing denied, nothing logged."""
    return Policy(name="allow-all", default="allow", default_log=False, rules=[],
                  source="<allow-all>")


@dataclass
class Compiled:
    """A policy ready for the mailbox: its filter, exit mask and engine table."""
    source: str
    cp: object
    table: object
    rate: float
    burst: int


def prepare(policy_path: str | None, mode: str | None, registry: list[str] | None = None) -> Compiled:
    """Load + compile + build the engine table; a UserError (exit 2) for any user mistake.
    `registry`: the rule descriptions of every table this VM had (rule ids stay valid across
    reloads, so records still in a ring decode right)."""
    pol = load_policy(policy_path) if policy_path else allow_all_policy()
    cp = compile_policy(pol, ignore_msrs())
    table = build_table(cp, mode, registry)
    if len(table.data) > layout.TABLE_MAX:
        raise UserError(f"the compiled policy is {len(table.data)} bytes; the shim takes "
                        f"{layout.TABLE_MAX}", pol.source)
    return Compiled(pol.source, cp, table, pol.audit_rate, pol.audit_burst)


class Wrap(VmmChannel, ToolHookup):
    """One VMM under a policy.  start(), then wait(); reload() and signal() from any thread."""

    def __init__(self, argv: list[str], policy: str | None = None, audit: str | None = None,
                 mode: str | None = None, stderr=None, max_vcpus: int = 64,
                 ring_capacity: int = 2048, vmm_stdout=None, vmm_stderr=None,
                 learn: str | None = None, introspect: IntrospectOptions | None = None,
                 reload_counter=None):
        if not argv:
            raise UserError("no VMM command given: kvmgate wrap [options] -- VMM [ARGS...]",
                            "argument VMM")
        self.argv = list(argv)
        self.policy_path, self.mode = policy, mode
        self.err = stderr or sys.stderr
        self.vmm_out, self.vmm_err = vmm_stdout, vmm_stderr   # None: inherited
        if learn and policy:
            raise UserError("--learn runs the VM without a policy (it records what the guest "
                            "does); drop --policy", "argument --learn")
        self._registry: list[str] = []
        self.compiled = prepare(policy, mode, self._registry)
        self.learner = None
        if learn:                  # numpy + tracefs only when learning (not in libvirt's QEMU)
            from .learn import WrapLearner
            self.learner = WrapLearner(learn)
        self.learned: tuple[int, int] | None = None
        self.audit = AuditLog(audit, rate=self.compiled.rate, burst=self.compiled.burst) \
            if audit or policy else AuditLog(None)
        self._now = 0.0
        self.audit.clock = lambda: self._now   # records carry the shim's CLOCK_REALTIME
        self.plan = layout.plan(max_vcpus, ring_capacity)
        self.shim = shim_path()
        self.proc: subprocess.Popen | None = None
        self.active = threading.Event()
        self.failures: list[str] = []
        self.reloads = {"done": 0, "refused": 0}
        self.reload_counter = reload_counter   # e.g. kvmgate.metrics.Reloads: count(applied)
        self._counts_collected = False         # the shared-memory counts are in self.audit
        self.announce: dict | None = None     # set: an audit `event` record when the shim is active
        self._seq = 0
        self._rules = self.compiled.table.rules
        self._replies: dict[int, str] = {}
        self._cv = threading.Condition()
        self._drain_lock = threading.Lock()
        self._rings: dict[int, Ring] = {}
        self._done = threading.Event()
        self._reload_wanted = threading.Event()
        self._vmm_gone = False
        self.introspect = introspect
        self.kvmi = None                   # the WrapBackend, with --introspect
        self.intro = None                  # its Introspection (hooked at the first KVM_RUN)
        self._tool = None                  # the tool's socket, connected + handshake done
        if introspect is not None and learn:
            raise UserError("--learn and --introspect do not go together", "argument --introspect")

    # ------------------------------------------------------------ shared memory
    def _write_mailbox(self, c: Compiled) -> int:
        mb = self.mailbox
        layout.fill_filter(mb.filter, c.cp.filter)
        mb.exit_mask = c.cp.exit_mask
        mb.name = c.source.encode()[:layout.NAME_BYTES - 1]
        data = c.table.data
        C.memmove(C.addressof(mb.table), data, len(data))
        mb.table_len = len(data)
        self._seq += 1
        mb.seq = self._seq                  # last: the shim reads it first (x86 TSO)
        return self._seq

    def stats(self) -> dict:
        """The shim's exit counters, summed over vCPUs."""
        out = dict.fromkeys(counters.EXIT_KINDS, 0)
        for s in counters.exit_stats(self.mem, self.plan, self.header).values():
            for k in out:
                out[k] += s[k]
        return out

    # ------------------------------------------------------------ rings
    def _ring(self, i: int) -> Ring | None:
        r = self._rings.get(i)
        if r is None:
            off = self.plan["rings_off"] + i * self.plan["ring_stride"]
            try:
                r = Ring(buffer=memoryview(self.mem)[off:off + self.plan["ring_stride"]])
            except ValueError:
                return None                 # not initialised by the shim yet
            self._rings[i] = r
        return r

    def drain(self) -> int:
        """Move every pending record from the vCPU rings into the audit log."""
        n = 0
        with self._drain_lock:
            for i in range(min(self.header.vcpus, self.plan["max_vcpus"])):
                ring = self._ring(i)
                if ring is None:
                    continue
                raw = ring.drain_raw()
                for rec, (t_ns, action) in zip(decode(raw, self._rules),
                                               ((r[0], r[8]) for r in RECORD.iter_unpack(raw))):
                    self._now = rec.time
                    f = rec.fields
                    if self.learner is not None:
                        self.learner.add(t_ns, f["index"], f["write"],
                                         f["value"] if f["write"] else _read_value(f["result"]),
                                         f["result"] == "#GP")
                    if action == 0:
                        continue                     # learn: an exit QEMU answered, no decision
                    if rec.logged:
                        self.audit.record(**f)
                    else:
                        self.audit.count(f["index"], f["write"], f["action"], f["result"])
                    n += 1
        return n

    def collect_counts(self) -> int:
        """Add the decisions the vCPUs counted in shared memory (not logged) to the audit
        counters; once, after the VMM is gone."""
        n = 0
        with self._drain_lock:
            if self._counts_collected:
                return 0
            for key, count in counters.shared_counts(self.mem, self.plan, self.header):
                self.audit.count(*key, n=count)
                n += count
            self._counts_collected = True
        return n

    # ------------------------------------------------------------ live counters (metrics)
    def decisions(self) -> list[dict]:
        """Decisions so far, as AuditLog.summary() rows: the drained ring records plus, while
        the VMM runs, the counts its vCPUs keep in shared memory (read, not moved: the vCPUs
        keep adding; collect_counts() moves them into the audit counters at the end)."""
        with self._drain_lock:
            rows = self.audit.summary()
            if self._counts_collected or not hasattr(self, "mem"):
                return rows
            live = list(counters.shared_counts(self.mem, self.plan, self.header))
        return counters.add_counts(rows, live)

    def exits_by_vcpu(self) -> dict[int, int]:
        """MSR exits per vCPU so far, all kinds (the shim's per-vCPU counters)."""
        if not hasattr(self, "mem"):
            return {}
        return {i: sum(s.values()) for i, s in counters.exit_stats(self.mem, self.plan, self.header).items()}

    def _count_reload(self, applied: bool) -> None:
        self.reloads["done" if applied else "refused"] += 1
        if self.reload_counter is not None:
            self.reload_counter.count(applied)

    def ring_drops(self) -> int:
        return sum(r.dropped for r in self._rings.values())

    def _drainer(self) -> None:
        while not self._done.wait(DRAIN_PERIOD):
            self.drain()

    # ------------------------------------------------------------ reload
    def request_reload(self) -> None:
        """Async-signal friendly: the reload runs in the control thread."""
        self._reload_wanted.set()

    def _controller(self) -> None:
        while True:
            self._reload_wanted.wait()
            if self._done.is_set():
                return
            self._reload_wanted.clear()
            self.reload()

    def reload(self) -> bool:
        """Re-read the policy file and install it in the running VM, all or nothing."""
        try:
            c = prepare(self.policy_path, self.mode, self._registry)
        except UserError as e:
            self._count_reload(False)        # counted before it is said (metrics match the log)
            print(f"kvmgate: reload refused, old policy stays: {e}", file=self.err, flush=True)
            return False
        if not self.active.is_set():
            self._count_reload(False)
            print("kvmgate: reload refused, old policy stays: no VM yet", file=self.err, flush=True)
            return False
        self._rules = c.table.rules          # a superset: old rule ids keep their meaning
        seq = self._write_mailbox(c)
        try:
            os.write(self.ctl_w, b"R")
        except BrokenPipeError:
            pass                             # the VMM is gone: the wait below sees it
        with self._cv:
            ok = self._cv.wait_for(lambda: seq in self._replies or self._vmm_gone, RELOAD_TIMEOUT)
            why = self._replies.pop(seq, None)
        if why is None and self.header.applied_seq == seq:
            why = ""                         # in force; the VMM exited before it could say so
        if why is None:
            why = "the VMM did not answer" if ok else "timed out waiting for the VMM"
        if why:
            self._count_reload(False)
            print(f"kvmgate: reload refused, old policy stays: {c.source}: {why}", file=self.err, flush=True)
            return False
        self.compiled = c
        self.audit.rate, self.audit.burst = c.rate, c.burst
        self._count_reload(True)
        print(f"kvmgate: reloaded {c.source}", file=self.err, flush=True)
        return True

    def wait(self) -> WrapResult:
        """Until the VMM is gone: its exit code (None when it is not our child)."""
        if self.proc is not None:
            rc = self.proc.wait()
        else:
            self._threads[0].join()               # the status pipe closes with the VMM
            rc = None
        self._done.set()
        self._reload_wanted.set()
        self._threads[0].join(timeout=5)      # the status pipe closes with the VMM
        # a reload in flight when the VMM exited: the VMM may have applied it (the guest saw the
        # new policy) without saying so; wait for the controller to settle and report it before
        # the exit summary, or an applied reload would go unreported (stress round, session 6)
        self._threads[2].join(timeout=RELOAD_TIMEOUT + 5)
        self._unhook_tool()
        self.drain()
        self.collect_counts()
        self.audit.close()
        if self.learner is not None:
            self.learned = self.learner.finish(f"learned-{Path(self.argv[0]).name}")
            print(f"kvmgate: wrote {self.learner.out}: {self.learned[1]} of {self.learned[0]} "
                  "MSR/direction pairs allowed, default deny", file=self.err, flush=True)
        os.close(self.ctl_w)
        if rc is not None and rc < 0:
            rc = 128 - rc
        exits = self.stats()
        return WrapResult(rc, self.active.is_set(), list(self.failures), self.audit.summary(),
                          exits, {"written": self.audit.written, "suppressed": self.audit.suppressed,
                                  "ring_dropped": self.ring_drops()}, dict(self.reloads))

    def run(self) -> WrapResult:
        self.start()
        return self.wait()


__all__ = ["Wrap", "WrapResult", "IntrospectOptions", "Compiled", "prepare", "allow_all_policy",
           "report", "as_json"]
