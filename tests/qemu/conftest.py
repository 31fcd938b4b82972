"""The libvirt daemons and kvmgate-qemu, once per test session for every libvirt test
(tests/qemu/libvirt_host.py)."""
import pytest

from .libvirt_host import Emulator, libvirt_daemons


@pytest.fixture(scope="session")
def libvirt():
    with libvirt_daemons():
        yield


@pytest.fixture(scope="session")
def emulator(libvirt):
    """One kvmgate-qemu <emulator> for every libvirt test domain of the session."""
    e = Emulator()
    yield e
    e.cleanup()
