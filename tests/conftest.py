"""Test tiers: pure (default), `kvm` (needs /dev/kvm), `differential` (model vs kernel)."""
import os

import pytest
from hypothesis import HealthCheck, settings

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
REQUIRE_KVM = os.environ.get("KVMGATE_REQUIRE_KVM") == "1"
SLOW = os.environ.get("KVMGATE_SLOW") == "1"

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", deadline=None, max_examples=2000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("slow" if SLOW else "ci")


@pytest.fixture(autouse=True)
def _kvm_tier(request):
    """KVM and differential tests skip without /dev/kvm, and fail instead when it is required."""
    node = request.node
    if (node.get_closest_marker("kvm") or node.get_closest_marker("differential")) and not HAVE_KVM:
        if REQUIRE_KVM:
            pytest.fail("KVMGATE_REQUIRE_KVM=1 but /dev/kvm is not usable")
        pytest.skip("/dev/kvm is not available")


def _tier(report) -> str:
    kw = report.keywords
    return "differential" if "differential" in kw else "kvm" if "kvm" in kw else "pure"


def pytest_terminal_summary(terminalreporter):
    import sys
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "when", "call") in ("call", "setup") and hasattr(rep, "keywords"):
                if outcome == "passed" and rep.when != "call":
                    continue
                counts.setdefault(_tier(rep), {}).setdefault(outcome, 0)
                counts[_tier(rep)][outcome] += 1
    if counts:
        parts = [f"{tier}: " + ", ".join(f"{n} {o}" for o, n in sorted(c.items()))
                 for tier, c in sorted(counts.items())]
        where = "/dev/kvm present" if HAVE_KVM else "no /dev/kvm"
        terminalreporter.write_line(f"tiers ({where}, KVMGATE_REQUIRE_KVM={int(REQUIRE_KVM)}): "
                                    + "; ".join(parts))
    for name, mod in sorted(sys.modules.items()):
        if name.startswith("tests.test_"):
            for line in getattr(mod, "SUMMARY_LINES", []):
                terminalreporter.write_line(line)
    mod = sys.modules.get("tests.test_differential")
    if mod is not None and mod.STATS["filters"]:
        s = mod.STATS
        terminalreporter.write_line(
            f"differential (model vs kernel): {s['filters']} filters ({s['accepted']} accepted, "
            f"{s['rejected']} rejected, errno compared for all), {s['accesses']} accesses, "
            f"{s['mismatches']} mismatches")
