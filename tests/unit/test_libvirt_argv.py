"""kvmgate-qemu's reading of QEMU command lines as libvirt writes them (pure)."""
import pytest

from kvmgate.wrap.domain import domain_name, is_probe, split_option


@pytest.mark.parametrize("value,parts", [
    ("guest=a,,b,debug-threads=on", ["guest=a,b", "debug-threads=on"]),
    ("guest=a,,,,b", ["guest=a,,b"]),
    ("guest=web", ["guest=web"]),
    ("guest=x,,", ["guest=x,"]),
])
def test_split_option_undoubles_commas(value, parts):
    assert split_option(value) == parts


@pytest.mark.parametrize("argv,name", [
    (["-name", "guest=a,,b,debug-threads=on", "-S"], "a,b"),
    (["-machine", "pc", "-name", "guest=web"], "web"),
    (["-name", "plain"], "plain"),
    (["-machine", "none,accel=kvm:tcg", "-qmp", "unix:/x,server=on", "-daemonize"], None),
])
def test_domain_name(argv, name):
    assert domain_name(argv) == name


@pytest.mark.parametrize("argv,probe", [
    (["-machine", "none,accel=kvm:tcg", "-qmp", "unix:/x,server=on,wait=off", "-daemonize"], True),
    (["-machine", "none,accel=tcg", "-qmp", "unix:/x", "-nographic"], True),
    (["-M", "none"], True),
    (["-version"], True),
    (["-help"], True),
    (["-machine", "pc,accel=kvm", "-kernel", "k.elf"], False),   # would run a guest
    (["-kernel", "k.elf"], False),
    ([], False),
])
def test_only_probes_run_without_a_domain(argv, probe):
    assert is_probe(argv) is probe
