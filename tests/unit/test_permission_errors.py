"""The owner's permission calls fail with the errno, ioctl name, object and reason of
docs/introspection.md §1 (written out here, not derived from the code)."""
import errno

import pytest

from kvmgate.errors import KvmError
from kvmgate.introspection.permissions import Permissions, check_feature

CMD, EVT = "KVM_INTROSPECTION_COMMAND", "KVM_INTROSPECTION_EVENT"
VM = "vm-object"


def fails(fn, *args):
    with pytest.raises(KvmError) as ei:
        fn(*args)
    e = ei.value
    return e.errno, e.ioctl, e.obj, e.strerror


@pytest.mark.parametrize("allow,fid,why", [
    (2, 2, "allow must be 0 or 1, not 2"),
    (-1, 2, "allow must be 0 or 1, not -1"),
    ("1", 2, "allow must be 0 or 1, not '1'"),
    (1, -2, "bad command id -2"),
    (1, "2", "bad command id '2'"),
    (1, 22, "unknown command id 22"),
    (1, 0, "unknown command id 0"),
])
def test_command_einval(allow, fid, why):
    assert fails(Permissions(VM).allow_command, fid, allow) == \
        (errno.EINVAL, CMD, VM, f"{CMD} on {VM!r}: {why}")


@pytest.mark.parametrize("allow,fid,why", [
    (3, 15, "allow must be 0 or 1, not 3"),
    (1, -5, "bad event id -5"),
    (0, 2, "unknown event id 2"),
])
def test_event_einval(allow, fid, why):
    assert fails(Permissions(VM).allow_event, fid, allow) == \
        (errno.EINVAL, EVT, VM, f"{EVT} on {VM!r}: {why}")


def test_check_feature_results_and_default_object():
    known = frozenset({2, 4})
    assert check_feature(1, 2, known, CMD) is True
    assert check_feature(0, 4, known, CMD) is False
    assert check_feature(1, -1, known, EVT) is True
    assert check_feature(0, -1, frozenset(), EVT) is False
    with pytest.raises(KvmError) as ei:
        check_feature(1, 3, known, EVT)
    assert (ei.value.errno, ei.value.obj, ei.value.strerror) == \
        (errno.EINVAL, None, f"{EVT}: unknown event id 3")


@pytest.mark.parametrize("cid,name", [(2, "GET_VERSION"), (4, "VM_CHECK_COMMAND"), (6, "VM_CHECK_EVENT")])
def test_always_allowed_cannot_be_disallowed(cid, name):
    p = Permissions(VM)
    assert fails(p.allow_command, cid, 0) == (errno.EPERM, CMD, VM, f"{CMD} on {VM!r}: {name} cannot be disallowed")
    assert p.command_allowed(cid)


def test_allow_and_disallow_one_and_all():
    p = Permissions()
    assert p.allowed_commands() == {2, 4, 6} and p.allowed_events() == frozenset()
    p.allow_command(8, 1)
    p.allow_command(25, 1)
    p.allow_command(8, 0)
    assert p.allowed_commands() == {2, 4, 6, 25}
    p.allow_command(-1, 1)
    assert {2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 25, 29} <= p.allowed_commands()
    p.allow_command(-1, 0)
    assert p.allowed_commands() == {2, 4, 6}
    p.allow_event(15, 1)
    p.allow_event(1, 1)
    p.allow_event(1, 0)
    assert p.allowed_events() == {15}
    p.allow_event(-1, 1)
    assert p.allowed_events() == {0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19}
    p.allow_event(-1, 0)
    assert p.allowed_events() == frozenset()


def test_repr_lists_names():
    p = Permissions()
    p.allow_event(15, 1)
    assert repr(p) == "Permissions(commands=[GET_VERSION,VM_CHECK_COMMAND,VM_CHECK_EVENT], events=[MSR])"
