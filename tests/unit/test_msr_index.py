"""MSR names generated from the kernel's msr-index.h (tools/gen_msr_names.py) and merged with
the hand-kept table."""
import importlib.util
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from kvmgate.msr import names

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_msr_names", ROOT / "tools" / "gen_msr_names.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

HEADER = """\
/* SPDX-License-Identifier: none: a made-up header in msr-index.h's style */
#define MSR_EFER\t\t0xc0000080 /* extended feature register */
#define _EFER_SCE\t\t0  /* SYSCALL/SYSRET */
#define MSR_TEST_CTRL\t\t\t\t0x00000033
#define MSR_TEST_CTRL_SPLIT_LOCK_DETECT_BIT\t29
#define MSR_TEST_CTRL_SPLIT_LOCK_DETECT\t\tBIT(MSR_TEST_CTRL_SPLIT_LOCK_DETECT_BIT)
#define MSR_IA32_UMWAIT_CONTROL_TIME_MASK\t(~0x03U)
#define MSR_PKG_C7_RESIDENCY\t\t0x000003fa
#define MSR_ATOM_PKG_C6_RESIDENCY\t0x000003fa
#define MSR_TOO_BIG\t\t0x100000000
"""


def test_generator_keeps_only_msr_numbers():
    rows = gen.parse_header(HEADER)
    assert rows == [(0xC0000080, "MSR_EFER", "extended feature register"),
                    (0x33, "MSR_TEST_CTRL", ""),
                    (0x3FA, "MSR_PKG_C7_RESIDENCY", ""),
                    (0x3FA, "MSR_ATOM_PKG_C6_RESIDENCY", "")]
    text = gen.render(rows, "v9.9")
    assert names.kernel_tag(text) == "v9.9"
    assert text.splitlines()[-1] == "0xc0000080\tMSR_EFER\textended feature register"


def test_generated_table_records_its_kernel_tag():
    assert names.kernel_tag().startswith("v6.")


def _kernel_rows():
    text = resources.files("kvmgate.msr").joinpath("msr_index.tsv").read_text()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            index, name, _ = line.split("\t")
            yield int(index, 16), name


def test_every_header_macro_names_its_msr():
    rows = list(_kernel_rows())
    assert len(rows) > 450
    wrong = [(hex(i), n, names.msr_index(n)) for i, n in rows if names.msr_index(n) != i]
    assert not wrong


@pytest.mark.parametrize("index,name", [(0xC0011028, "MSR_AMD64_FP_CFG"), (0x2D9, "MSR_INTEGRITY_CAPS"),
                                        (0x1AE, "MSR_TURBO_RATIO_LIMIT1")])
def test_indices_the_hand_kept_table_lacked(index, name):
    info = names.msr_info(index)
    assert info is not None and name in (info.name, *info.aliases)
    assert info.source == f"msr-index.h {names.kernel_tag()}"


def test_hand_kept_names_win_and_header_macros_become_aliases():
    info = names.msr_info(0x1A0)
    assert info.name == "IA32_MISC_ENABLE" and "MSR_IA32_MISC_ENABLE" in info.aliases
    info = names.msr_info(0x3FA)
    assert {info.name, *info.aliases} >= {"MSR_PKG_C7_RESIDENCY", "MSR_ATOM_PKG_C6_RESIDENCY"}


def test_rows_the_header_lacks_name_their_source():
    header = {i for i, _ in _kernel_rows()}
    extras = [m for m in names.all_msrs() if m.index not in header]
    assert extras and all(m.source for m in extras)
    assert names.msr_info(0x4B564D00).source.endswith("kvm_para.h")     # MSR_KVM_WALL_CLOCK_NEW


def test_policy_check_accepts_names_from_msr_index_h(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[policy]\nname = "hdr"\ndefault = "allow"\n\n[[rule]]\n'
                 'msrs = ["MSR_AMD64_FP_CFG", "MSR_INTEGRITY_CAPS", "MSR_TURBO_RATIO_LIMIT1"]\n'
                 'access = "both"\naction = "deny"\n')
    r = subprocess.run([sys.executable, "-m", "kvmgate", "policy", "check", str(p)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
