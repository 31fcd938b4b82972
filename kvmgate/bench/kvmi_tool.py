"""A bare kvmi-v7 tool (libkvmi's dialect, docs/introspection.md, "4. The dialect deployed
tools speak: libkvmi and `kvmi-v7`"), written with plain struct rather than kvmgate's codecs,
as the script the introspection benchmarks run in a process of its own (as a real tool runs;
a thread of ours would also compete for this process's GIL).

It enables the MSR event (CONTROL_EVENTS, message 9; unless told not to) and controls one MSR
(CONTROL_MSR, message 11) on vCPU 0, then answers every MSR event (message 1) CONTINUE with
the guest's new value, or with the old one for the first event when `revert_first`.
"""
from __future__ import annotations

import subprocess

# kvmi_event_msr follows the common event header: old_value at 544 + 8, new_value at 544 + 16.
_SETUP = '''
f = s.makefile("rb")
seq = [0]
def request(mid, body):
    seq[0] += 1
    s.sendall(struct.pack("=HHI", mid, len(body), seq[0]) + body)
    h = f.read(8); size = struct.unpack("=HHI", h)[1]; err = struct.unpack_from("=i", f.read(size))[0]
    assert err == 0, err
vcpu0 = struct.pack("=HHI", 0, 0, 0)
if {enable_event}:
    request(9, vcpu0 + struct.pack("=HBBI", 2, 1, 0, 0))           # CONTROL_EVENTS(MSR)
request(11, vcpu0 + struct.pack("=BBHI", 1, 0, 0, {msr}))          # CONTROL_MSR
'''
_SERVE = '''
first = {revert_first}
while True:
    h = f.read(8)
    if len(h) < 8:
        break
    mid, size, seq_ = struct.unpack("=HHI", h)
    body = f.read(size)
    vcpu = struct.unpack_from("=H", body, 2)[0]
    old, new = struct.unpack_from("=QQ", body, 544 + 8)
    s.sendall(struct.pack("=HHI", 0, 24, seq_) + struct.pack("=HHI", vcpu, 0, 0)
              + struct.pack("=BBHI", 0, 2, 0, 0) + struct.pack("=Q", old if first else new))
    first = False
'''

# The socket: an inherited fd (argv[1]; argv[2] "1" enables the event), or a unix socket path
# (argv[1]) where the tool listens and takes QEMU's handshake as libkvmi does.
_FROM_FD = '''
import socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
'''
_LISTEN = '''
import socket, struct, sys
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); ls.bind(sys.argv[1]); ls.listen(1)
sys.stdout.write("listening\\n"); sys.stdout.flush()
s, _ = ls.accept(); ls.close()
size = struct.unpack("=I", s.recv(4, socket.MSG_WAITALL))[0]; s.recv(size - 4, socket.MSG_WAITALL)
s.sendall(struct.pack("=I20s", 24, bytes(20)))
'''
_READY = '''
sys.stdout.write("ready\\n"); sys.stdout.flush()
'''


def fd_tool(msr: int) -> str:
    """The tool on an inherited socket: `python -c SCRIPT FD 1|0` (1: enable the MSR event);
    it prints "ready" once it controls the MSR."""
    return (_FROM_FD + _SETUP.format(enable_event='sys.argv[2] == "1"', msr=msr) + _READY
            + _SERVE.format(revert_first=False))


def listening_tool(msr: int) -> str:
    """The tool listening on a unix socket: `python -c SCRIPT PATH`; it prints "listening",
    takes QEMU's handshake, enables the MSR event and reverts the first write."""
    return _LISTEN + _SETUP.format(enable_event=True, msr=msr) + _SERVE.format(revert_first=True)


def reap(proc: subprocess.Popen) -> None:
    """Wait for a tool process (it ends when its socket closes), killing it after 10 s."""
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


__all__ = ["fd_tool", "listening_tool", "reap"]
