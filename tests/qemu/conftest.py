"""The libvirt daemons, once per test session for every libvirt test (tests/qemu/libvirt_host.py)."""
import pytest

from .libvirt_host import libvirt_daemons


@pytest.fixture(scope="session")
def libvirt():
    with libvirt_daemons():
        yield
