"""The reader token (kvmgate/introspection/inbox.py, docs/introspection.md §3): a vCPU waiting
for its event reply reads the socket itself, answers the commands it meets, hands other vCPUs'
replies over; the reader thread serves commands while nobody waits; a disconnect or a bad reply
releases every waiting vCPU.  Pure: a fake Backend over socket.socketpair()."""
import struct
import threading

from kvmgate.introspection import ids
from kvmgate.introspection import protocol as p
from kvmgate.introspection.ids import CONTINUE

from .test_introspection_server import LSTAR, STATE, TIMEOUT, Rig, Spawn


class ThreadRecordingRig(Rig):
    """READ_PHYSICAL records the name of the thread that served it."""

    def __init__(self):
        super().__init__()
        self.served_by = []
        real = self.backend.read_physical

        def read_physical(gpa, size):
            self.served_by.append(threading.current_thread().name)
            return real(gpa, size)
        self.backend.read_physical = read_physical

    def control_both(self):
        self.allow_all()
        for v in (0, 1):
            self.client.vcpu_control_events(v, ids.VCPU_EVENT_MSR, True)
            self.client.control_msr(v, LSTAR, True)


def test_commands_while_a_vcpu_waits_are_served_by_that_vcpu_thread():
    rig = ThreadRecordingRig()
    try:
        rig.control_both()
        rig.client.read_physical(0, 8)                 # nobody waits: the reader thread
        vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
        ev = rig.client.next_event()
        for _ in range(3):                             # commands between event and reply
            assert rig.client.read_physical(0, 8) == bytes(8)
        assert rig.client.get_version().version == 1
        ev.reply_msr(5)
        assert vcpu.result() == (CONTINUE, 5)
        assert rig.served_by[0].endswith("-reader")
        assert rig.served_by[1:] == ["vcpu-test"] * 3
        rig.client.read_physical(0, 8)                 # and the reader thread again after
        assert rig.served_by[-1].endswith("-reader")
    finally:
        rig.close()
    assert not rig.server.internal_errors


def test_replies_out_of_order_reach_their_vcpus():
    rig = ThreadRecordingRig()
    try:
        rig.control_both()
        a = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 0x10, STATE)
        b = Spawn(rig.intro.msr_event, 1, LSTAR, 1, 0x11, STATE)
        evs = {}
        for _ in range(2):
            ev = rig.client.next_event()
            evs[ev.vcpu] = ev
        assert rig.server.waiting(0) and rig.server.waiting(1)
        evs[1].reply_msr(0x111)                        # the second vCPU first
        assert b.result() == (CONTINUE, 0x111)
        assert rig.server.waiting(0)
        rig.client.read_physical(0, 4)
        evs[0].reply_msr(0x100)
        assert a.result() == (CONTINUE, 0x100)
        # both replies in one send: each still reaches its own vCPU
        a = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 0x20, STATE)
        b = Spawn(rig.intro.msr_event, 1, LSTAR, 1, 0x21, STATE)
        evs = {}
        for _ in range(2):
            ev = rig.client.next_event()
            evs[ev.vcpu] = ev
        rig.sock.sendall(b"".join(
            p.pack_event_reply(evs[v].seq, v, CONTINUE, ids.VCPU_EVENT_MSR,
                               struct.pack("=Q", 0x200 + v)) for v in (1, 0)))
        assert (a.result(), b.result()) == ((CONTINUE, 0x200), (CONTINUE, 0x201))
        assert rig.intro.connected
    finally:
        rig.close()
    assert not rig.server.internal_errors


def test_disconnect_while_two_vcpus_wait_releases_both():
    rig = ThreadRecordingRig()
    rig.control_both()
    a = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 0x10, STATE)
    b = Spawn(rig.intro.msr_event, 1, LSTAR, 1, 0x11, STATE)
    for _ in range(2):
        rig.client.next_event()
    rig.sock.close()                                   # the tool goes away
    assert a.result(TIMEOUT) == (CONTINUE, 0x10)       # the guest's values, no hang
    assert b.result(TIMEOUT) == (CONTINUE, 0x11)
    assert rig.server.join(TIMEOUT)
    assert rig.closes == ["EOF"] and not rig.intro.connected
    assert rig.backend.controlled == set()             # interceptions undone
    rig.intro.unhook()
    assert not rig.server.internal_errors


def test_a_bad_reply_read_by_a_vcpu_closes_and_releases_it():
    rig = ThreadRecordingRig()
    rig.control_both()
    a = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 0x10, STATE)
    b = Spawn(rig.intro.msr_event, 1, LSTAR, 1, 0x11, STATE)
    evs = [rig.client.next_event() for _ in range(2)]
    rig.sock.sendall(p.pack_event_reply(evs[0].seq + 1000, evs[0].vcpu, CONTINUE,
                                        ids.VCPU_EVENT_MSR, bytes(8)))     # wrong seq
    assert {a.result(), b.result()} == {(CONTINUE, 0x10), (CONTINUE, 0x11)}
    assert rig.server.join(TIMEOUT)
    assert "protocol error" in rig.closes[0] and "seq" in rig.closes[0]
    assert rig.sock.recv(100) == b""
    rig.intro.unhook()
    assert not rig.server.internal_errors


def test_unhook_while_a_vcpu_reads_the_socket():
    rig = ThreadRecordingRig()
    rig.control_both()
    a = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 0x10, STATE)
    rig.client.next_event()
    assert rig.server.waiting(0)
    rig.intro.unhook()                                 # the owner, from another thread
    assert a.result(TIMEOUT) == (CONTINUE, 0x10)
    assert rig.server.join(TIMEOUT) and rig.closes == ["unhook"]
    assert not rig.server.internal_errors
