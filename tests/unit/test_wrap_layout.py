"""kvmgate/wrap/layout.py mirrors csrc/shim_abi.h: sizes and offsets as the C compiler sees
them (the shim and the parent must agree byte for byte)."""
import ctypes as C
import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmgate.wrap import layout

CSRC = Path(__file__).resolve().parents[2] / "csrc"
STRUCTS = {
    "shim_header": (layout.ShimHeader, ["mailbox_off", "rings_off", "stats_off", "vcpus", "counts_off",
                                        "counts_slots", "applied_seq", "options", "kvmi_off"]),
    "shim_mailbox": (layout.ShimMailbox, ["seq", "name", "filter", "table"]),
    "shim_filter": (layout.ShimFilter, ["nranges", "ranges"]),
    "shim_range": (layout.ShimRange, ["nmsrs", "bitmap"]),
    "shim_stats": (layout.ShimStats, ["gp", "host", "tool"]),
    "shim_kvmi": (layout.ShimKvmi, ["nmsrs", "msrs"]),
    "shim_kvmi_vcpu": (layout.ShimKvmiVcpu, ["pause_req", "req_result", "old_value", "tsc_khz",
                                             "regs", "sregs", "state_msrs", "req_msrs",
                                             "req_values"]),
    "shim_count": (layout.ShimCount, ["value", "count"]),
}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_ctypes_mirror_matches_the_c_header(tmp_path):
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "shim_abi.h"', "int main(void) {"]
    for name, (_, fields) in STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for f in fields:
            lines.append(f'printf("{name}.{f} %zu\\n", offsetof(struct {name}, {f}));')
    lines += ["return 0;", "}"]
    src, exe = tmp_path / "abi.c", tmp_path / "abi"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-I", str(CSRC), "-o", str(exe), str(src)], check=True)
    got = dict(line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                        text=True).stdout.splitlines())
    for name, (cls, fields) in STRUCTS.items():
        assert int(got[name]) == C.sizeof(cls), name
        for f in fields:
            assert int(got[f"{name}.{f}"]) == getattr(cls, f).offset, f"{name}.{f}"


def test_plan_is_aligned_and_disjoint():
    p = layout.plan(max_vcpus=4, ring_capacity=64, counts_slots=16)
    spans = sorted([(p["stats_off"], 4 * C.sizeof(layout.ShimStats)),
                    (p["counts_off"], 4 * 16 * C.sizeof(layout.ShimCount)),
                    (p["mailbox_off"], C.sizeof(layout.ShimMailbox)),
                    (p["rings_off"], 4 * p["ring_stride"]),
                    (p["kvmi_off"], 5 * layout.KVMI_STRIDE)])
    assert spans[0][0] >= C.sizeof(layout.ShimHeader)
    for (a, n), (b, _) in itertools.pairwise(spans):
        assert a + n <= b and b % layout.PAGE == 0
    assert p["kvmi_off"] + 5 * layout.KVMI_STRIDE == p["total_size"]
    assert C.sizeof(layout.ShimKvmiVcpu) <= layout.KVMI_STRIDE
    assert p["ring_stride"] >= layout.RING_HEADER + 64 * layout.RECORD_SIZE
