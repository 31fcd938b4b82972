"""kvmgate-qemu's reading of libvirt's QEMU command line and of the per-domain settings."""
import pytest

from kvmgate.errors import UserError
from kvmgate.wrap.domain import domain_name, load_domain, split_option


def test_doubled_commas_are_literal():
    assert split_option("guest=a,,b,debug-threads=on") == ["guest=a,b", "debug-threads=on"]
    assert split_option("x,,,,y") == ["x,,y"]
    assert split_option("a,") == ["a", ""]


@pytest.mark.parametrize("argv,name", [
    (["-machine", "q35", "-name", "guest=web,debug-threads=on", "-m", "1"], "web"),
    (["-name", "guest=a,,b,debug-threads=on"], "a,b"),
    (["-name", "debug-threads=on,guest=x"], "x"),
    (["-name", "plain"], "plain"),
    (["-machine", "none,accel=kvm:tcg", "-qmp", "unix:/x,server", "-daemonize"], None),  # probe
    (["-name"], None),
])
def test_domain_name(argv, name):
    assert domain_name(argv) == name


def test_settings(tmp_path):
    (tmp_path / "web.toml").write_text('policy = "/p.toml"\naudit = "/a.jsonl"\n')
    cfg = load_domain("web", str(tmp_path), "/run/x")
    assert (cfg.policy, cfg.audit, cfg.mode, cfg.pidfile) == ("/p.toml", "/a.jsonl", None, "/run/x/web.pid")


@pytest.mark.parametrize("text,needle", [
    (None, "no kvmgate settings"),
    ('audit = "/a"\n', "policy"),
    ('policy = "/p"\nfoo = 1\n', "unknown keys"),
    ('policy = "/p"\nmode = "loose"\n', "mode"),
    ('policy = 3\n', "non-empty string"),
    ('policy = \n', "not valid TOML"),
])
def test_bad_settings_are_user_errors_naming_the_file(tmp_path, text, needle):
    if text is not None:
        (tmp_path / "d.toml").write_text(text)
    with pytest.raises(UserError) as e:
        load_domain("d", str(tmp_path))
    assert needle in str(e.value) and str(tmp_path / "d.toml") in str(e.value)


@pytest.mark.parametrize("name", ["../etc", ".hidden", "a/b", ""])
def test_names_that_cannot_be_files(tmp_path, name):
    with pytest.raises(UserError):
        load_domain(name, str(tmp_path))
