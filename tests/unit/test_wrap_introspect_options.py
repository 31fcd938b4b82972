"""`kvmgate wrap --introspect` arguments: connect mode only, ids checked before QEMU starts."""
import pytest

from kvmgate.errors import UserError
from kvmgate.introspection.abi import V7, V12
from kvmgate.wrap.session import IntrospectOptions


def test_connect_unix_defaults_to_the_libkvmi_abi():
    o = IntrospectOptions.parse("connect:unix:/tmp/t.sock", None, ["CONTROL_MSR"], ["MSR"])
    assert (o.family, o.address, o.abi) == ("unix", "/tmp/t.sock", V7)
    assert len(o.uuid) == 16 and any(o.uuid) and o.commands and o.events


def test_v12_can_be_asked_for():
    assert IntrospectOptions.parse("connect:unix:/tmp/t.sock", "v12", [], []).abi is V12


@pytest.mark.parametrize("spec", ["unix:/tmp/t.sock", "connect:tcp:1", "connect:vsock:x:1"])
def test_anything_but_connect_mode_is_a_user_error(spec):
    with pytest.raises(UserError) as e:
        IntrospectOptions.parse(spec, None, [], [])
    assert "--introspect" in str(e.value)


def test_unknown_command_is_a_user_error():
    with pytest.raises(UserError, match="NOT_A_COMMAND"):
        IntrospectOptions.parse("connect:unix:/tmp/t.sock", None, ["NOT_A_COMMAND"], [])
