"""docs/introspection.md §1: the owner's permission model and hook/unhook/allow errors (pure: no /dev/kvm)."""
import errno
import os
import socket
import struct
import tempfile
import uuid

import pytest

from kvmgate.errors import KvmError
from kvmgate.introspection import ids
from tests.introspection_fake import FakeBackend
from kvmgate.introspection.owner import Introspection
from kvmgate.introspection.permissions import Permissions

UUID = bytes(range(16))
UNKNOWN_COMMANDS = [0, 1, 22, 24, 26, 28, 30, 31, 100, 1234, 2**31 - 1]
UNKNOWN_EVENTS = [2, 4, 18, 20, 21, 22, 100, 2**31 - 1]


def err_of(fn, *args):
    with pytest.raises(KvmError) as ei:
        fn(*args)
    return ei.value.errno


# --- Permissions (pure) ---------------------------------------------------------------------

def test_defaults_only_the_three_always_allowed_commands_and_no_event():
    p = Permissions()
    assert p.allowed_commands() == {ids.GET_VERSION, ids.VM_CHECK_COMMAND, ids.VM_CHECK_EVENT}
    assert p.allowed_commands() == ids.ALWAYS_ALLOWED == {2, 4, 6}
    assert p.allowed_events() == frozenset()
    for cid in ids.COMMANDS - ids.ALWAYS_ALLOWED:
        assert not p.command_allowed(cid)
    for eid in ids.EVENTS:
        assert not p.event_allowed(eid)


def test_known_ids_are_every_v12_command_and_event():
    assert ids.COMMANDS == {2, 4, 6, 8, 10, 12, 14, 16, 18, 20,
                            3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29}
    assert ids.EVENTS == {0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19}


@pytest.mark.parametrize("cid", sorted(ids.COMMANDS))
def test_every_known_command_can_be_allowed_and_disallowed(cid):
    p = Permissions()
    p.allow_command(cid, 1)
    assert p.command_allowed(cid)
    if cid in ids.ALWAYS_ALLOWED:
        assert err_of(p.allow_command, cid, 0) == errno.EPERM
        assert p.command_allowed(cid)
    else:
        p.allow_command(cid, 0)
        assert not p.command_allowed(cid)


@pytest.mark.parametrize("eid", sorted(ids.EVENTS))
def test_every_known_event_can_be_allowed_and_disallowed(eid):
    p = Permissions()
    p.allow_event(eid, 1)
    assert p.event_allowed(eid)
    p.allow_event(eid, 0)
    assert not p.event_allowed(eid)


@pytest.mark.parametrize("allow", [2, 3, 0xFFFFFFFF, -1, 1.0, None, "1"])
def test_allow_not_0_or_1_is_einval(allow):
    p = Permissions()
    for fn, fid in ((p.allow_command, ids.VM_GET_INFO), (p.allow_command, -1),
                    (p.allow_event, ids.VCPU_EVENT_MSR), (p.allow_event, -1)):
        assert err_of(fn, fid, allow) == errno.EINVAL
    assert p.allowed_commands() == ids.ALWAYS_ALLOWED and not p.allowed_events()


@pytest.mark.parametrize("fid", [-2, -3, -(2**31), -1000])
def test_id_below_minus_one_is_einval(fid):
    p = Permissions()
    assert err_of(p.allow_command, fid, 1) == errno.EINVAL
    assert err_of(p.allow_event, fid, 1) == errno.EINVAL


@pytest.mark.parametrize("cid", UNKNOWN_COMMANDS)
def test_unknown_command_is_einval_both_ways(cid):
    p = Permissions()
    assert err_of(p.allow_command, cid, 1) == errno.EINVAL
    assert err_of(p.allow_command, cid, 0) == errno.EINVAL
    assert not p.command_allowed(cid)


@pytest.mark.parametrize("eid", UNKNOWN_EVENTS)
def test_unknown_event_is_einval_both_ways(eid):
    p = Permissions()
    assert err_of(p.allow_event, eid, 1) == errno.EINVAL
    assert err_of(p.allow_event, eid, 0) == errno.EINVAL


@pytest.mark.parametrize("cid", sorted(ids.ALWAYS_ALLOWED))
def test_disallowing_an_always_allowed_command_is_eperm(cid):
    p = Permissions()
    with pytest.raises(KvmError) as ei:
        p.allow_command(cid, 0)
    assert ei.value.errno == errno.EPERM
    assert ei.value.ioctl == "KVM_INTROSPECTION_COMMAND"
    assert isinstance(ei.value, OSError)


def test_minus_one_means_all():
    p = Permissions()
    p.allow_command(-1, 1)
    assert p.allowed_commands() == ids.COMMANDS
    p.allow_command(-1, 0)          # resets to the three, without error
    assert p.allowed_commands() == ids.ALWAYS_ALLOWED
    p.allow_event(-1, 1)
    assert p.allowed_events() == ids.EVENTS
    p.allow_event(-1, 0)
    assert p.allowed_events() == frozenset()


def test_single_changes_after_all():
    p = Permissions()
    p.allow_command(-1, 1)
    p.allow_command(ids.VM_WRITE_PHYSICAL, 0)
    assert not p.command_allowed(ids.VM_WRITE_PHYSICAL) and p.command_allowed(ids.VM_READ_PHYSICAL)
    p.allow_event(-1, 1)
    p.allow_event(ids.VCPU_EVENT_MSR, 0)
    assert not p.event_allowed(ids.VCPU_EVENT_MSR) and p.event_allowed(ids.VCPU_EVENT_PAUSE)


def test_errors_name_the_ioctl():
    p = Permissions(obj="vm0")
    with pytest.raises(KvmError) as ei:
        p.allow_event(2, 1)
    assert ei.value.ioctl == "KVM_INTROSPECTION_EVENT" and ei.value.obj == "vm0"
    assert "vm0" in str(ei.value)


# --- the owner object -------------------------------------------------------------------------

@pytest.fixture
def intro():
    i = Introspection(FakeBackend(), obj="vm0")
    yield i
    i.unhook()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_not_hooked_is_efault(intro):
    assert err_of(intro.allow_command, -1, 1) == errno.EFAULT
    assert err_of(intro.allow_event, -1, 1) == errno.EFAULT
    assert err_of(intro.allow_command, ids.VM_GET_INFO, 0) == errno.EFAULT


def test_invalid_arguments_are_checked_before_hooked(intro):
    # the seed validates the feature before looking for the introspection structure
    assert err_of(intro.allow_command, -1, 2) == errno.EINVAL
    assert err_of(intro.allow_event, 1234, 1) == errno.EINVAL


def test_disabled_is_eperm_first(pair):
    i = Introspection(FakeBackend(), enabled=False)
    assert err_of(i.hook, pair[0], UUID) == errno.EPERM
    assert err_of(i.allow_command, -1, 1) == errno.EPERM
    assert err_of(i.allow_command, -5, 7) == errno.EPERM
    assert err_of(i.allow_event, -1, 1) == errno.EPERM
    assert not i.hooked


def test_disabled_after_hook(intro, pair):
    intro.hook(pair[0], UUID)
    intro.enabled = False
    assert err_of(intro.allow_command, ids.VM_GET_INFO, 1) == errno.EPERM
    assert err_of(intro.allow_event, ids.VCPU_EVENT_MSR, 1) == errno.EPERM
    assert intro.unhook() is True       # the owner can always detach


def test_seed_selftest_sequence(intro, pair):
    """hook_introspection() of the seed's kvmi_test.c."""
    assert err_of(intro.allow_command, -1, 1) == errno.EFAULT
    assert err_of(intro.allow_event, -1, 1) == errno.EFAULT
    assert err_of(intro.hook, -1, UUID) == errno.EINVAL
    intro.hook(pair[0], UUID)
    assert err_of(intro.hook, pair[0], UUID) == errno.EEXIST
    assert err_of(intro.allow_command, -1, 2) == errno.EINVAL
    intro.allow_command(-1, 0)
    intro.allow_command(-1, 1)
    assert err_of(intro.allow_event, -1, 2) == errno.EINVAL
    intro.allow_event(-1, 0)
    intro.allow_event(-1, 1)
    assert intro.permissions.allowed_commands() == ids.COMMANDS
    assert intro.permissions.allowed_events() == ids.EVENTS


def test_hook_defaults_and_rehook_resets(intro, pair):
    intro.hook(pair[0], uuid.UUID(bytes=UUID))
    assert intro.hooked and intro.connected and intro.uuid == UUID
    assert intro.permissions.allowed_commands() == ids.ALWAYS_ALLOWED
    assert intro.permissions.allowed_events() == frozenset()
    intro.allow_command(-1, 1)
    intro.allow_event(-1, 1)
    assert err_of(intro.allow_command, ids.GET_VERSION, 0) == errno.EPERM
    assert intro.unhook() is True
    assert not intro.hooked and intro.permissions is None
    assert err_of(intro.allow_command, -1, 1) == errno.EFAULT
    a, b = socket.socketpair()
    try:
        intro.hook(a, UUID)
        assert intro.permissions.allowed_commands() == ids.ALWAYS_ALLOWED
        assert intro.permissions.allowed_events() == frozenset()
    finally:
        intro.unhook()
        a.close()
        b.close()


def test_unhook_when_not_hooked_is_not_an_error(intro):
    assert intro.unhook() is False


@pytest.mark.parametrize("bad", [b"", bytes(15), bytes(17), "0" * 16, None, 12])
def test_bad_uuid_is_einval(intro, pair, bad):
    assert err_of(intro.hook, pair[0], bad) == errno.EINVAL
    assert not intro.hooked


def test_not_a_stream_socket_is_einval(intro):
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    unconnected = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    with tempfile.TemporaryFile() as f:
        try:
            for bad in (d1, unconnected, r, f, -1, 999999, "sock", None):
                assert err_of(intro.hook, bad, UUID) == errno.EINVAL, bad
                assert not intro.hooked
        finally:
            for s in (d1, d2, unconnected):
                s.close()
            os.close(r)
            os.close(w)


def test_hook_accepts_a_file_descriptor_and_the_owner_may_close_its_copy(intro, pair):
    a, b = pair
    intro.hook(a.fileno(), UUID)
    a.close()
    b.settimeout(5)
    b.sendall(struct.pack("=HHI", ids.GET_VERSION, 0, 7))
    assert len(b.recv(100)) == 8 + 8 + 16


def test_errors_are_kvm_errors_with_the_ioctl_name(intro, pair):
    with pytest.raises(KvmError) as ei:
        intro.allow_event(ids.VCPU_EVENT_MSR, 1)
    assert ei.value.ioctl == "KVM_INTROSPECTION_EVENT" and ei.value.errno == errno.EFAULT
    intro.hook(pair[0], UUID)
    with pytest.raises(KvmError) as ei:
        intro.hook(pair[0], UUID)
    assert ei.value.ioctl == "KVM_INTROSPECTION_HOOK" and ei.value.errno == errno.EEXIST


def test_repr_lists_commands_and_events_by_name():
    p = Permissions()
    p.allow_event(ids.VCPU_EVENT_MSR, 1)
    p.allow_event(ids.VCPU_EVENT_PAUSE, 1)
    first, second = sorted([ids.VCPU_EVENT_MSR, ids.VCPU_EVENT_PAUSE])     # by id
    assert repr(p).endswith(f"events=[{ids.event_name(first)},{ids.event_name(second)}])")
    for c in ids.ALWAYS_ALLOWED:
        assert ids.command_name(c) in repr(p)
