"""The kvmi-v7 (libkvmi) ABI and connect mode against the running kernel, with a tool written
from libkvmi's headers (tests/kvmi_v7_client.py, independent of kvmgate's codec).

`kvmgate run GUEST --introspect connect:unix:PATH` connects to the listening tool, does QEMU's
handshake and serves the session: the tool pauses every vCPU with a libkvmi batch, enables the
MSR event and LSTAR, lets the guest go, accepts one LSTAR write and reverts the next, and the
guest reads back the value the tool chose.  Every wait is bounded; the child is always killed
and reaped.
"""
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from kvmgate import Machine
from kvmgate.exits import GuestError
from kvmgate.guest import DATA
from kvmgate.introspection.session import serve

from .. import kvmi_v7_client as v7

ROOT = Path(__file__).resolve().parents[2]
T = 30.0
LSTAR = 0xC0000082
FIRST, SECOND = 0xFFFFFFFF11111000, 0xFFFFFFFF22222000
FLAG = DATA

# Every vCPU spins until FLAG is set; then vCPU 0 writes LSTAR twice and reads it back.
GUEST = f"""
    mov rsi, {FLAG:#x}
spin:
    pause
    mov rax, [rsi]
    test rax, rax
    jz spin
    test rdi, rdi
    jnz done
    mov ecx, {LSTAR:#x}
    mov edx, {FIRST >> 32:#x}
    mov eax, {FIRST & 0xFFFFFFFF:#x}
    wrmsr
    mov eax, {SECOND & 0xFFFFFFFF:#x}
    wrmsr
    rdmsr
done:
    hlt
"""


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="kvmgate-v7-", dir="/tmp")   # short: unix socket paths
    yield Path(d)
    for f in Path(d).iterdir():
        f.unlink()
    os.rmdir(d)


class Run:
    """`kvmgate run` in a child process, killed and reaped on exit."""

    def __init__(self, workdir, *args):
        guest = workdir / "watched.S"
        guest.write_text(GUEST)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmgate", "run", str(guest), "--vcpus", "2", "--timeout",
             "60", "--json", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

    def result(self):
        out, err = self.proc.communicate(timeout=T)
        assert self.proc.returncode == 0, err
        return json.loads(out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def host_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    pytest.skip("no vendor_id in /proc/cpuinfo")


def accept(listener) -> socket.socket:
    listener.settimeout(T)
    conn, _ = listener.accept()
    conn.settimeout(T)
    return conn


def test_libkvmi_style_msr_monitor_over_connect_mode(workdir):
    path = str(workdir / "tool.sock")
    with v7.listen_unix(path) as listener, Run(
            workdir, "--introspect", f"connect:unix:{path}",
            "--allow-commands", "GET_GUEST_INFO,GET_VCPU_INFO,PAUSE_VCPU,CONTROL_EVENTS",
            "--allow-commands", "CONTROL_MSR,READ_PHYSICAL,WRITE_PHYSICAL,GET_CPUID",
            "--allow-events", "MSR,PAUSE_VCPU") as run:
        tool = v7.Tool(accept(listener))
        # QEMU's handshake: struct_size, uuid, padding, start_time, name
        size, uuid, pad, start, name = tool.do_handshake()
        assert (size, pad, len(uuid)) == (96, 0, 16) and start > 0
        assert name.rstrip(b"\0") == b"watched"
        assert tool.get_version() == (1, 0, bytes(8))
        assert tool.check_command(v7.CONTROL_MSR) == 0
        assert tool.check_command(v7.GET_REGISTERS) == -v7.KVM_EPERM      # not allowed
        assert tool.check_command(v7.CONTROL_CR) == -v7.KVM_ENOENT        # not served
        assert tool.check_event(v7.EV_MSR) == 0
        assert tool.check_event(v7.EV_UNHOOK) == -v7.KVM_EPERM
        assert tool.check_event(v7.EV_CR) == -v7.KVM_ENOENT
        assert tool.vcpu_count() == 2
        assert tool.tsc_speed() > 0
        _, ebx, ecx, edx = tool.get_cpuid(0, 0)        # leaf 0: the vendor string
        assert struct.pack("<3I", ebx, edx, ecx).decode() == host_vendor()
        assert tool.max_gfn() == ((4 << 20) - 1) >> 12

        # libkvmi's kvmi_pause_all_vcpus: one reply for the whole batch, one PAUSE per vCPU
        assert tool.pause_all_vcpus(2) == b""
        pauses = [tool.next_event(), tool.next_event()]
        assert sorted(e.vcpu for e in pauses) == [0, 1]
        assert all(e.event == v7.EV_PAUSE_VCPU and e.size == 544 for e in pauses)
        # while both vCPUs are paused: hook LSTAR on vCPU 0, refuse what is not allowed
        tool.control_events(0, v7.EV_MSR)
        tool.control_msr(0, LSTAR)
        assert tool.error_of(v7.GET_REGISTERS, v7.VCPU_HDR.pack(0, 0, 0) + bytes(8)) == \
            -v7.KVM_EPERM
        assert tool.error_of(v7.CONTROL_CR, v7.VCPU_HDR.pack(0, 0, 0) + bytes(8)) == \
            -v7.KVM_EOPNOTSUPP                         # KVM has no CR exit: the session goes on
        assert tool.error_of(v7.CONTROL_EVENTS, v7.VCPU_HDR.pack(0, 0, 0)
                             + struct.pack("<HBBI", v7.EV_CR, 1, 0, 0)) == -v7.KVM_EINVAL
        tool.write_physical(FLAG, struct.pack("<Q", 1))
        assert tool.read_physical(FLAG, 8) == struct.pack("<Q", 1)
        for e in pauses:
            tool.reply(e)

        first = tool.next_event()
        assert (first.event, first.vcpu, first.size) == (v7.EV_MSR, 0, 544)
        msr, _, old, new = first.msr
        assert (msr, new) == (LSTAR, FIRST) and first.lstar == old
        tool.reply_msr(first, new)                     # keep the guest's value
        second = tool.next_event()
        msr, _, old, new = second.msr
        assert (msr, old, new) == (LSTAR, FIRST, SECOND)
        tool.reply_msr(second, old)                    # revert it
        result = run.result()
    regs = result["regs"]["0"]
    assert (int(regs["rdx"], 16) << 32) | int(regs["rax"], 16) == FIRST   # what the guest saw


def test_v12_session_over_connect_mode_keeps_permissions(workdir):
    """The same connect mode with --kvmi-abi v12: a tool speaking v12 gets v12 answers, and a
    command the owner did not allow gets -KVM_EPERM."""
    path = str(workdir / "tool.sock")
    hdr, errc = struct.Struct("=HHI"), struct.Struct("=iI")
    with v7.listen_unix(path) as listener, Run(
            workdir, "--introspect", f"connect:unix:{path}", "--kvmi-abi", "v12",
            "--allow-commands", "VM_WRITE_PHYSICAL") as run:
        conn = accept(listener)
        tool = v7.Tool(conn)
        tool.do_handshake()

        def request(mid, payload=b""):
            conn.sendall(hdr.pack(mid, len(payload), 5) + payload)
            rid, rseq, body = tool.read_message()
            assert (rid, rseq) == (mid, 5)
            return errc.unpack_from(body)[0], body[8:]

        assert request(2) == (0, struct.pack("=II8s", 1, 8184, bytes(8)))      # GET_VERSION
        assert request(8)[0] == -v7.KVM_EPERM                                 # VM_GET_INFO
        assert request(4, struct.pack("=HHI", 25, 0, 0))[0] == -v7.KVM_EPERM  # CHECK VCPU_CONTROL_MSR
        assert request(4, struct.pack("=HHI", 14, 0, 0))[0] == 0              # CHECK VM_WRITE_PHYSICAL
        # VM_WRITE_PHYSICAL {u64 gpa; u16 size; u16; u32; data}: let the guest finish
        assert request(14, struct.pack("=QHHI", FLAG, 8, 0, 0) + struct.pack("<Q", 1))[0] == 0
        run.result()
        assert conn.recv(64) == b""                    # unhooked at the end of the run


def test_handshake_errors_are_user_errors(workdir):
    """A tool that is not there, closes early or answers a short handshake: exit 2, one line."""
    path = str(workdir / "tool.sock")
    with Run(workdir, "--introspect", f"connect:unix:{path}") as run:
        out, err = run.proc.communicate(timeout=T)
    assert run.proc.returncode == 2 and "cannot connect" in err and "Traceback" not in err
    for answer in (b"", struct.pack("<I", 8) + bytes(4)):
        with v7.listen_unix(path) as listener, Run(
                workdir, "--introspect", f"connect:unix:{path}") as run:
            conn = accept(listener)
            conn.recv(96)
            conn.sendall(answer)
            conn.close()
            out, err = run.proc.communicate(timeout=T)
        assert run.proc.returncode == 2 and "handshake" in err and "Traceback" not in err


def test_cookie_checked_against_the_key(workdir):
    import hashlib
    path = str(workdir / "tool.sock")
    key = workdir / "key"
    key.write_bytes(b"secret")
    with v7.listen_unix(path) as listener, Run(
            workdir, "--introspect", f"connect:unix:{path}", "--introspect-key", str(key)) as run:
        v7.Tool(accept(listener)).do_handshake(cookie=hashlib.sha1(b"wrong").digest())
        out, err = run.proc.communicate(timeout=T)
    assert run.proc.returncode == 2 and "cookie" in err
    with v7.listen_unix(path) as listener, Run(
            workdir, "--introspect", f"connect:unix:{path}", "--introspect-key", str(key),
            "--allow-commands", "WRITE_PHYSICAL") as run:
        tool = v7.Tool(accept(listener))
        tool.do_handshake(cookie=hashlib.sha1(b"secret").digest())
        tool.write_physical(FLAG, struct.pack("<Q", 1))
        run.result()


def test_inject_exception_reaches_the_guest(workdir):
    """INJECT_EXCEPTION (#UD) at a PAUSE event: the guest takes it at its next entry."""
    path = str(workdir / "tool.sock")
    with v7.listen_unix(path) as listener, Machine(GUEST) as m:
        done = {}

        def tool_side():
            tool = v7.Tool(accept(listener))
            tool.do_handshake()
            assert m.wait_running(T)          # inject into the running guest, not before run()
            tool.pause_all_vcpus(1)
            ev = tool.next_event()
            tool.request(v7.INJECT_EXCEPTION, v7.VCPU_HDR.pack(0, 0, 0)
                         + struct.pack("<BBHIQ", 6, 0, 0, 0, 0))
            tool.reply(ev)
            done["ok"] = True

        t = threading.Thread(target=tool_side, daemon=True)
        t.start()
        h = serve(m, f"connect:unix:{path}", ["PAUSE_VCPU,INJECT_EXCEPTION"], ["PAUSE_VCPU"])
        try:
            with pytest.raises(GuestError) as ei:
                m.run(timeout=T)
        finally:
            h.close()
        t.join(T)
    assert done.get("ok")
    assert "#UD" in str(ei.value)


def test_introspection_options_without_introspect_are_refused(workdir):
    with Run(workdir, "--kvmi-abi", "v7") as run:
        out, err = run.proc.communicate(timeout=T)
    assert run.proc.returncode == 2 and "--kvmi-abi: only with --introspect" in err
