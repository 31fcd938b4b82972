"""Test tiers, one folder each: `unit` (pure code), `kvm` (needs /dev/kvm), `differential`
(model, engine and shim vs the running kernel), `fuzz` (arbitrary bytes into every parser) and
`qemu` (needs qemu-system-x86_64 and /dev/kvm).

A test's tier is its folder; the folder adds the marker, so `-m kvm` etc. select a tier.
Tiers that need something skip with the reason when it is missing, and fail instead when
`KVMGATE_REQUIRE_KVM=1` / `KVMGATE_REQUIRE_QEMU=1` (as `.ci/run` sets them).
"""
import os
import shutil
import sys

import pytest
from hypothesis import HealthCheck, settings

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
REQUIRE_KVM = os.environ.get("KVMGATE_REQUIRE_KVM") == "1"
REQUIRE_QEMU = os.environ.get("KVMGATE_REQUIRE_QEMU") == "1"
SLOW = os.environ.get("KVMGATE_SLOW") == "1"

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", deadline=None, max_examples=2000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("slow" if SLOW else "ci")

TIERS = ("unit", "kvm", "differential", "fuzz", "qemu")


def tier_of(path) -> str:
    """The tier folder a test file lives in (tests/<tier>/test_x.py)."""
    parts = os.path.normpath(str(path)).split(os.sep)
    for name in reversed(parts[:-1]):
        if name in TIERS:
            return name
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item.fspath)
        if tier != "unit":
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _tier_requirements(request):
    """KVM, differential and QEMU tests skip without what they need, and fail instead when it
    is required."""
    node = request.node
    needs_kvm = any(node.get_closest_marker(m) for m in ("kvm", "differential", "qemu"))
    if needs_kvm and not HAVE_KVM:
        if REQUIRE_KVM:
            pytest.fail("KVMGATE_REQUIRE_KVM=1 but /dev/kvm is not usable")
        pytest.skip("/dev/kvm is not available")
    if node.get_closest_marker("qemu") and not HAVE_QEMU:
        if REQUIRE_QEMU:
            pytest.fail("KVMGATE_REQUIRE_QEMU=1 but qemu-system-x86_64 is not installed")
        pytest.skip("qemu-system-x86_64 is not installed")


def pytest_terminal_summary(terminalreporter):
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "when", "call") in ("call", "setup") and hasattr(rep, "fspath"):
                if outcome == "passed" and rep.when != "call":
                    continue
                tier = tier_of(rep.fspath)
                counts.setdefault(tier, {}).setdefault(outcome, 0)
                counts[tier][outcome] += 1
    if counts:
        parts = [f"{tier}: " + ", ".join(f"{n} {o}" for o, n in sorted(c.items()))
                 for tier, c in sorted(counts.items())]
        where = "/dev/kvm present" if HAVE_KVM else "no /dev/kvm"
        where += ", qemu present" if HAVE_QEMU else ", no qemu"
        terminalreporter.write_line(f"tiers ({where}, KVMGATE_REQUIRE_KVM={int(REQUIRE_KVM)}, "
                                    f"KVMGATE_REQUIRE_QEMU={int(REQUIRE_QEMU)}): " + "; ".join(parts))
    for name, mod in sorted(sys.modules.items()):
        if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"):
            for line in getattr(mod, "SUMMARY_LINES", []):
                terminalreporter.write_line(line)
    mod = sys.modules.get("tests.differential.test_differential")
    if mod is not None and mod.STATS["filters"]:
        s = mod.STATS
        terminalreporter.write_line(
            f"differential (model vs kernel): {s['filters']} filters ({s['accepted']} accepted, "
            f"{s['rejected']} rejected, errno compared for all), {s['accesses']} accesses, "
            f"{s['mismatches']} mismatches")
