"""The VMM process and the channel the parent shares with the shim inside it (a mixin of
session.Wrap): the shared memory (kvmgate.wrap.layout), the control and status pipes, starting
the VMM as a child or exec'ing it (libvirt), and the status lines the shim sends back."""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
import threading

from ..errors import UserError
from ..signal_pipe import SignalPipe
from . import layout
from .result import report


class VmmChannel:
    """Needs from session.Wrap: argv, plan, compiled, learner, introspect, shim, err, audit,
    _write_mailbox(), _hook_tool(), the reply condition `_cv` and the threads' targets."""

    _signals: SignalPipe | None = None        # install_signal_handlers()

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
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                SignalPipe((signal.SIGHUP,)).open().serve(
                    {signal.SIGHUP: lambda _sig: self.request_reload()}, "kvmgate-keeper-signals")
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

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads; SIGINT/SIGTERM go to the VMM; whichever thread of this process the
        kernel hands them to (kvmgate/signal_pipe.py: a Python handler alone would wait for the
        main thread, blocked in waitpid, for ever).  They stay until restore_signal_handlers():
        a SIGHUP or SIGTERM after the VMM is gone then does nothing (SIG_DFL would end the
        wrap before its summary)."""
        pipe = SignalPipe((signal.SIGHUP, signal.SIGINT, signal.SIGTERM)).open()
        pipe.serve({signal.SIGHUP: lambda _sig: self.request_reload(),
                    signal.SIGINT: self.signal, signal.SIGTERM: self.signal}, "kvmgate-wrap-signals")
        self._signals = pipe

    def restore_signal_handlers(self) -> None:
        pipe, self._signals = self._signals, None
        if pipe is not None:
            pipe.close()


__all__ = ["VmmChannel"]
