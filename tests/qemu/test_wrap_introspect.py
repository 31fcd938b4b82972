"""`kvmgate wrap --introspect connect:unix:PATH -- qemu ...`: a libkvmi-style tool
(tests/kvmi_v7_client.py, written from libkvmi's headers, not from kvmgate's codec) listens,
the wrapped QEMU's kvmgate connects with QEMU's handshake, and the tool watches and reverts the
guest's LSTAR writes on a 2-vCPU QEMU guest; the vCPUs wait inside QEMU (the shim)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvmgate.wrap import pvhguest

from .. import kvmi_v7_client as k7
from .test_wrap import ROOT, TIMEOUT, wrap_argv

LSTAR = 0xC0000082
LSTAR_BASE = 0xFFFFFFFF81A00000
CONTINUED = 3                  # MSR events answered with the guest's value before the revert
ALLOWED = ("GET_GUEST_INFO,GET_VCPU_INFO,PAUSE_VCPU,CONTROL_EVENTS,CONTROL_MSR,GET_REGISTERS")


@pytest.fixture(scope="module")
def lstar_guest(tmp_path_factory):
    """vCPU 0 writes LSTAR = base+1, base+2, ... until a write does not stick, prints what it
    read ("V"), then both vCPUs run the table (an LSTAR write, its read-back)."""
    d = tmp_path_factory.mktemp("kvmi-guest")
    acc = [(LSTAR, 1, LSTAR_BASE), (LSTAR, 0, 0)]
    return pvhguest.build(acc, d, vcpus=2, write_loop=True, name="lstar")


class Wrapped:
    """The tool listening, `kvmgate wrap --introspect` started, the connection accepted."""

    def __init__(self, tmp_path, elf, *opts):
        path = str(tmp_path / "kvmi.sock")
        self.listener = k7.listen_unix(path)
        self.listener.settimeout(0.2)             # to notice a kvmgate that exits instead
        self.proc = subprocess.Popen(
            wrap_argv("--introspect", f"connect:unix:{path}", *opts) + pvhguest.qemu_argv(elf, 2),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)               # its QEMU is killed with it (close)
        self.tool = None
        deadline = time.monotonic() + TIMEOUT
        try:
            while True:
                try:
                    conn, _ = self.listener.accept()
                    break
                except TimeoutError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"kvmgate never connected: {self.proc.communicate()}")
        except BaseException:
            self.close()
            raise
        conn.settimeout(TIMEOUT)
        self.tool = k7.Tool(conn)

    def finish(self):
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out, err

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)    # kvmgate and the QEMU it started
        except ProcessLookupError:
            pass
        self.proc.communicate()
        if self.tool is not None:
            self.tool.sock.close()
        self.listener.close()


@pytest.fixture
def wrapped(tmp_path, lstar_guest):
    made = []

    def start(*opts, guest=None):
        w = Wrapped(tmp_path, guest or lstar_guest, *opts)
        made.append(w)
        return w

    yield start
    for w in made:
        w.close()


def answer_until_closed(tool, log):
    """Answer every further event with CONTINUE (the guest's value) until kvmgate unhooks."""
    try:
        while True:
            ev = tool.next_event()
            log.append((ev.vcpu, ev.event, ev.msr if ev.event == k7.EV_MSR else None))
            if ev.event == k7.EV_MSR:
                tool.reply_msr(ev, ev.msr[3])
            else:
                tool.reply(ev)
    except (EOFError, OSError):
        return


def test_tool_watches_and_reverts_lstar_writes_of_a_wrapped_qemu_guest(wrapped):
    w = wrapped("--allow-commands", ALLOWED, "--allow-events", "MSR,PAUSE")
    t = w.tool
    size, uuid, _pad, start, name = t.do_handshake()
    assert size == 96 and any(uuid) and start > 0 and name.rstrip(b"\0") == b"kvmgate-wrap"
    version, _, _ = t.get_version()
    assert version == 1
    assert t.check_command(k7.CONTROL_MSR) == 0 and t.check_event(k7.EV_MSR) == 0
    assert t.check_command(k7.GET_CPUID) == -k7.KVM_EPERM       # not in the allow list
    assert t.error_of(k7.GET_CPUID, k7.VCPU_HDR.pack(0, 0, 0) + b"\0" * 8) == -k7.KVM_EPERM
    assert t.vcpu_count() == 2
    assert t.tsc_speed(0) > 0

    # libkvmi's kvmi_pause_all_vcpus: one batch; then both vCPUs wait in QEMU for us
    t.pause_all_vcpus(2)
    paused = [t.next_event(), t.next_event()]
    assert sorted(ev.vcpu for ev in paused) == [0, 1]
    assert all(ev.event == k7.EV_PAUSE_VCPU for ev in paused)
    mode, regs, msrs = t.get_registers(0, [LSTAR])           # served by the parked vCPU thread
    assert mode in (2, 4, 8) and len(regs) == 18 and msrs[0][0] == LSTAR
    for v in (0, 1):
        t.control_events(v, k7.EV_MSR)
        t.control_msr(v, LSTAR)
    for ev in paused:
        t.reply(ev)

    # vCPU 0's loop: every write arrives as an MSR event; the 4th is reverted
    prev_new = None
    for i in range(CONTINUED + 1):
        ev = t.next_event()
        assert (ev.event, ev.vcpu) == (k7.EV_MSR, 0)
        msr, _, old, new = ev.msr
        assert msr == LSTAR and new & ~0xFFFFFFFF == LSTAR_BASE & ~0xFFFFFFFF
        assert ev.lstar == old                    # the event's state block has LSTAR too
        if prev_new is not None:
            assert old == prev_new and new == old + 1
        prev_new = new
        if i < CONTINUED:
            t.reply_msr(ev, new)
    t.reply_msr(ev, old)                           # revert: the guest must read `old` back
    reverted = old
    later = []
    answerer = threading.Thread(target=answer_until_closed, args=(t, later), daemon=True)
    answerer.start()
    rc, out, err = w.finish()
    answerer.join(TIMEOUT)
    assert rc == pvhguest.EXIT_OK, err
    res = pvhguest.parse(out)
    assert res["done"] and res["reverted"] == reverted
    for v in (0, 1):                               # the table's write, continued: it sticks
        assert res[(v, LSTAR, 0)] == (LSTAR_BASE, 0)
    assert {(v, k7.EV_MSR) for v, ev, _ in later} == {(0, k7.EV_MSR), (1, k7.EV_MSR)}
    assert "introspection tool at connect:unix:" in err and "hooked" in err


def test_unreachable_tool_is_a_user_error_and_qemu_never_starts(tmp_path, lstar_guest):
    r = subprocess.run(wrap_argv("--introspect", f"connect:unix:{tmp_path / 'none.sock'}")
                       + pvhguest.qemu_argv(lstar_guest, 2), cwd=ROOT, capture_output=True, check=False,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 2
    assert "cannot connect to the introspection tool" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_listen_mode_is_refused_for_wrap(tmp_path, lstar_guest):
    r = subprocess.run(wrap_argv("--introspect", f"unix:{tmp_path / 's'}")
                       + pvhguest.qemu_argv(lstar_guest, 2), cwd=ROOT, capture_output=True, check=False,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "connect:unix:PATH" in r.stderr and "Traceback" not in r.stderr


def test_crash_answer_stops_qemu_and_says_why(wrapped):
    w = wrapped("--allow-commands", "CONTROL_EVENTS,CONTROL_MSR", "--allow-events", "MSR")
    t = w.tool
    t.do_handshake()
    t.control_events(0, k7.EV_MSR)
    t.control_msr(0, LSTAR)
    ev = t.next_event()
    assert ev.event == k7.EV_MSR and ev.msr[0] == LSTAR
    t.reply(ev, k7.CRASH, k7.struct.pack("<Q", ev.msr[3]))
    rc, out, err = w.finish()
    assert rc == 1
    assert "answered an MSR event with CRASH" in err
    assert "DONE" not in out and "V " not in out


def test_control_msr_the_policy_denies_gets_eperm(wrapped, tmp_path):
    pol = tmp_path / "deny-lstar.toml"
    pol.write_text('[policy]\ndefault = "allow"\n[[rule]]\nmsr = "IA32_LSTAR"\n'
                   'access = "write"\naction = "deny"\n[[rule]]\nmsr = 0x40001234\n'
                   'access = "read"\naction = "constant"\nvalue = 1\n')
    # the guest spins until it reads 2 from 0x40001234 (the policy answers 1): it is still
    # running when the tool asks (lstar_guest, its LSTAR writes denied, would be done at once
    # and QEMU gone, under load before the tool's CONTROL_MSR)
    spin = pvhguest.build([(0x40001234, 0, 0)], tmp_path, vcpus=2, wait=2, name="spin")
    w = wrapped("--policy", str(pol), "--allow-commands", "CONTROL_EVENTS,CONTROL_MSR",
                "--allow-events", "MSR", guest=spin)
    t = w.tool
    t.do_handshake()
    t.control_events(0, k7.EV_MSR)
    assert t.error_of(k7.CONTROL_MSR, k7.VCPU_HDR.pack(0, 0, 0)
                      + k7.struct.pack("<BBHI", 1, 0, 0, LSTAR)) == -k7.KVM_EPERM
    assert w.proc.poll() is None                    # the guest was running all along


def test_wrap_introspect_bench(tmp_path):
    """`kvmgate bench wrap-introspect`: in the last round, every LSTAR write (and the sync
    write) went to the policy rule on one path and to the tool as an MSR event on the other."""
    r = subprocess.run([sys.executable, "-m", "kvmgate", "bench", "wrap-introspect", "-n", "100",
                        "--json"], capture_output=True, text=True, timeout=TIMEOUT * 4, cwd=ROOT,
                       check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rounds"] == 7 and res["writes"] == 100
    ex = res["last_round_exits"]
    assert ex["policy"]["policy"] == 101 and ex["policy"]["tool"] == 0
    # 100 timed writes + the sync write the tool reverted; the shim's `tool` counter also
    # counts writes caught before the tool's VCPU_CONTROL_MSR was answered (no event for those,
    # docs/introspection.md §3 "When control starts"): seen 116 on a loaded machine
    assert ex["event"]["events"] == 101 and ex["event"]["tool"] >= 101
    assert res["policy_cycles_per_write"] > 0 and res["event_cycles_per_write"] > 0
    assert len(res["load_average"]) == 2
