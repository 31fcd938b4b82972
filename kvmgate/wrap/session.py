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
"""
from __future__ import annotations

import ctypes as C
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
import uuid as _uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..audit import AuditLog
from ..engine import Ring, build_table, decode
from ..engine.ring import RECORD
from ..errors import UserError
from ..hostinfo import ignore_msrs
from ..introspection.connector import HandshakeError, _connect, handshake
from ..introspection.listener import parse_ids
from ..introspection.owner import Introspection
from ..introspection.session import dialect_for, parse_spec
from ..policy import Policy, compile_policy, load_policy
from ..report import table
from . import counters, layout
from .introspect import WrapBackend
from .library import shim_path

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


@dataclass
class WrapResult:
    returncode: int
    active: bool                          # the policy was installed in a VM
    failures: list[str]                   # what the shim refused (fail closed), in order
    summary: list[dict]                   # AuditLog.summary(): decisions per MSR
    exits: dict                           # shim counters summed over vCPUs
    audit: dict                           # written / suppressed / ring drops
    reloads: dict = field(default_factory=dict)


class Wrap:
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
    def _setup_memory(self) -> None:
        p = self.plan
        self.memfd = os.memfd_create("kvmgate-shim", 0)
        os.ftruncate(self.memfd, p["total_size"])
        self.mem = mmap.mmap(self.memfd, p["total_size"], mmap.MAP_SHARED)
        h = layout.ShimHeader.from_buffer(self.mem, 0)
        h.magic, h.version = layout.MAGIC, layout.VERSION
        h.max_vcpus, h.ring_capacity = p["max_vcpus"], p["ring_capacity"]
        h.mailbox_off, h.rings_off, h.ring_stride = p["mailbox_off"], p["rings_off"], p["ring_stride"]
        h.total_size, h.stats_off = p["total_size"], p["stats_off"]
        h.counts_off, h.counts_slots = p["counts_off"], p["counts_slots"]
        h.options = layout.OPT_LEARN if self.learner is not None else 0
        if self.introspect is not None:
            h.options |= layout.OPT_KVMI
            h.kvmi_off = p["kvmi_off"]
        self.header = h
        self.mailbox = layout.ShimMailbox.from_buffer(self.mem, p["mailbox_off"])
        self._write_mailbox(self.compiled)

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

    # ------------------------------------------------------------ status lines from the shim
    def _reader(self) -> None:
        with os.fdopen(self.status_r, "r", errors="replace") as f:
            for line in f:
                word, _, rest = line.rstrip("\n").partition(" ")
                if word == "active":
                    print(f"kvmgate: policy {self.compiled.source} active in VMM pid "
                          f"{rest.split()[0]}", file=self.err, flush=True)
                    if self.announce is not None:         # kvmgate-qemu: the audit's first record
                        self.audit.event("active", policy=str(self.compiled.source),
                                         pid=int(rest.split()[0]), **self.announce)
                    self.active.set()
                elif word in ("reloaded", "refused"):
                    seq, _, why = rest.partition(" ")
                    with self._cv:
                        self._replies[int(seq)] = "" if word == "reloaded" else why
                        self._cv.notify_all()
                elif word == "failed":
                    self.failures.append(rest)
                elif word == "learn-wait":
                    self._start_learning(int(rest.split()[0]))
                elif word.startswith("kvmi") and self.kvmi is not None:
                    if word == "kvmi-run" and self.intro is None:
                        self._hook_tool()
                    self.kvmi.on_status(word, rest)
        with self._cv:
            self._vmm_gone = True
            self._cv.notify_all()

    def _start_learning(self, pid: int) -> None:
        """The shim holds KVM_CREATE_VM until kvm:kvm_msr recording of the VMM runs."""
        try:
            self.learner.start(pid)
        except (UserError, OSError) as e:
            print(f"kvmgate: learn: cannot record the VM's MSR accesses: {e}", file=self.err, flush=True)
            self.failures.append(f"learn: {e}")
            self.learner = None
            os.write(self.ctl_w, b"X")            # the shim refuses the VM
            return
        os.write(self.ctl_w, b"G")

    # ------------------------------------------------------------ introspection
    def _connect_tool(self) -> None:
        """Before the VMM starts: connect to the tool and do QEMU's handshake (UserError if
        it cannot be reached or refuses); the session is hooked at the first KVM_RUN, when
        QEMU has created every vCPU."""
        self._tool = self.introspect.connect()
        self.kvmi = WrapBackend(self)

    def _hook_tool(self) -> None:
        o = self.introspect
        self.intro = Introspection(self.kvmi, obj=self, event_timeout=o.event_timeout)
        self.kvmi.intro = self.intro
        try:
            self.intro.hook(self._tool, o.uuid, commands=o.commands, events=o.events, abi=o.abi)
            print(f"kvmgate: introspection tool at {o.where} hooked ({o.abi.name} ABI, "
                  f"{self.kvmi.vcpu_count()} vCPUs)", file=self.err, flush=True)
        except OSError as e:
            print(f"kvmgate: introspection: cannot hook the tool: {e}", file=self.err, flush=True)
            self.failures.append(f"introspection: {e}")
        finally:
            self._tool.close()

    def _unhook_tool(self) -> None:
        if self.intro is not None:
            self.intro.unhook(wait=self.introspect.unhook_wait)
        elif self._tool is not None:
            self._tool.close()
        if self.kvmi is not None:
            self.kvmi.close()

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
            print(f"kvmgate: reload refused, old policy stays: {e}", file=self.err, flush=True)
            self._count_reload(False)
            return False
        if not self.active.is_set():
            print("kvmgate: reload refused, old policy stays: no VM yet", file=self.err, flush=True)
            self._count_reload(False)
            return False
        self._rules = c.table.rules          # a superset: old rule ids keep their meaning
        seq = self._write_mailbox(c)
        os.write(self.ctl_w, b"R")
        with self._cv:
            ok = self._cv.wait_for(lambda: seq in self._replies or self._vmm_gone, RELOAD_TIMEOUT)
            why = self._replies.pop(seq, None)
        if why is None and self.header.applied_seq == seq:
            why = ""                         # in force; the VMM exited before it could say so
        if why is None:
            why = "the VMM did not answer" if ok else "timed out waiting for the VMM"
        if why:
            print(f"kvmgate: reload refused, old policy stays: {c.source}: {why}", file=self.err, flush=True)
            self._count_reload(False)
            return False
        self.compiled = c
        self.audit.rate, self.audit.burst = c.rate, c.burst
        print(f"kvmgate: reloaded {c.source}", file=self.err, flush=True)
        self._count_reload(True)
        return True

    # ------------------------------------------------------------ the VMM
    def _channel(self) -> tuple[dict, tuple[int, int, int]]:
        """Shared memory + pipes; the VMM's environment and the fds it must inherit."""
        self._setup_memory()
        if self.introspect is not None:
            self._connect_tool()
        ctl_r, self.ctl_w = os.pipe()
        self.status_r, status_w = os.pipe()
        env = dict(os.environ)
        pre = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{self.shim}{' ' + pre if pre else ''}"
        env[layout.ENV] = f"{self.memfd}:{ctl_r}:{status_w}"
        return env, (self.memfd, ctl_r, status_w)

    def _start_threads(self) -> None:
        self._threads = [threading.Thread(target=t, name=f"kvmgate-wrap-{t.__name__}", daemon=True)
                         for t in (self._reader, self._drainer, self._controller)]
        for t in self._threads:
            t.start()

    def start(self) -> None:
        """Start the VMM as a child (kvmgate wrap)."""
        env, fds = self._channel()
        try:
            self.proc = subprocess.Popen(self.argv, env=env, pass_fds=fds,
                                         stdout=self.vmm_out, stderr=self.vmm_err)
        except OSError as e:
            raise UserError(f"cannot start the VMM: {e.strerror}", self.argv[0]) from None
        finally:
            os.close(fds[1])
            os.close(fds[2])
        self._start_threads()

    def exec_vmm(self, pidfile: str | None = None):
        """Become the VMM (libvirt: its pidfile names this process, so QEMU must be exec'ed
        here).  A detached grandchild keeps the parent side: drains the audit, reloads on
        SIGHUP (its pid in `pidfile`), prints the run-end counters when the VMM is gone."""
        env, fds = self._channel()
        pid = os.fork()
        if pid == 0:                                   # child: fork the keeper, then leave
            os.close(fds[1])
            os.close(fds[2])
            if os.fork() != 0:
                os._exit(0)
            os.setsid()
            code = 1
            try:
                if pidfile:
                    with open(pidfile, "w") as f:
                        f.write(f"{os.getpid()}\n")
                signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                self._start_threads()
                report(self.wait(), self.err)
                code = 0
            finally:
                if pidfile:
                    try:
                        os.unlink(pidfile)
                    except OSError:
                        pass
                os._exit(code)
        os.waitpid(pid, 0)
        os.close(self.ctl_w)
        os.close(self.status_r)
        for fd in fds:
            os.set_inheritable(fd, True)
        os.execve(self.argv[0], self.argv, env)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def install_signal_handlers(self) -> dict:
        """SIGHUP reloads; SIGINT/SIGTERM go to the VMM.  Returns the old handlers."""
        old = {signal.SIGHUP: signal.signal(signal.SIGHUP, lambda *_: self.request_reload())}
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, lambda n, _f: self.signal(n))
        return old

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


@dataclass
class IntrospectOptions:
    """`--introspect connect:...` of `kvmgate wrap` (kvmgate.introspection.session's spec)."""
    where: str
    family: str
    address: object
    abi: object
    commands: tuple
    events: tuple
    name: str = "kvmgate-wrap"
    key: bytes | None = None
    uuid: bytes = b""
    event_timeout: float | None = None
    unhook_wait: float = 1.0

    @classmethod
    def parse(cls, spec: str, abi: str | None, commands, events, key: bytes | None = None,
              name: str = "kvmgate-wrap") -> IntrospectOptions:
        """UserError for anything but connect mode or bad ids (exit 2)."""
        t = parse_spec(spec)
        if not t.connect:
            raise UserError(f"{spec!r}: kvmgate wrap connects to the tool as QEMU does: "
                            "connect:unix:PATH or connect:vsock:CID:PORT", "--introspect")
        return cls(spec, t.family, t.address, dialect_for(abi, t),
                   tuple(parse_ids(commands, "command")), tuple(parse_ids(events, "event")),
                   name, key, _uuid.uuid4().bytes)

    def connect(self):
        """A connected socket with QEMU's handshake done (UserError if not)."""
        s = _connect(self.family, self.address)
        try:
            handshake(s, self.uuid, self.name, int(time.time()), self.key)
        except HandshakeError as exc:
            s.close()
            raise UserError(f"introspection handshake refused: {exc}", "--introspect") from None
        return s


def report(r: WrapResult, out) -> None:
    """The run-end counters for people (as `kvmgate run` prints its decisions)."""
    e = r.exits
    code = "" if r.returncode is None else f" with code {r.returncode}"
    print(f"kvmgate: VMM exited{code}: MSR exits {e['policy']} answered by the policy, "
          f"{e['vmm']} by the VMM, {e['gp']} #GP (nobody asked), {e['host']} carried out as "
          f"KVM would; audit records {r.audit['written']} written, {r.audit['suppressed']} "
          f"suppressed, {r.audit['ring_dropped']} dropped (ring full)", file=out)
    if not r.active:
        why = f": {r.failures[0]}" if r.failures else ""
        print(f"kvmgate: the policy was never installed (no VM was created{why})", file=out)
    if r.summary:
        table(r.summary, out=out)
    out.flush()


def as_json(r: WrapResult) -> dict:
    return {"returncode": r.returncode, "policy_active": r.active, "failures": r.failures,
            "exits": r.exits, "audit": r.audit, "reloads": r.reloads, "decisions": r.summary}
