"""Every kind of bad input at kvmgate's doors -- policy files, guest files, CLI arguments -- is
the project's own error: exit 2, one line naming the file (and line and field), nothing run."""
import os
import subprocess
import sys
import time

import pytest

from kvmgate.asm import assemble
from kvmgate.cli import main
from kvmgate.errors import AsmError, GuestFileError, InputFileError, PolicyError, UserError
from kvmgate.guest import CODE, MAX_PROGRAM, load_guest
from kvmgate.inputs import read_user_file
from kvmgate.policy import load_policy, parse_policy

# --- files: regular files only, bounded ------------------------------------------------------


def test_reader_refuses_devices_fifos_directories_and_big_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                  # no writer: an open without O_NONBLOCK hangs
    for path, why in [("/dev/zero", "character device"), (fifo, "FIFO"), (tmp_path, "directory"),
                      (tmp_path / "missing", "No such file")]:
        with pytest.raises(InputFileError, match=why) as e:
            read_user_file(path, "policy", 100)
        assert e.value.where == str(path)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(InputFileError, match="101 bytes; at most 100"):
        read_user_file(big, "policy", 100)
    assert read_user_file(big, "policy", 101) == b"x" * 101


def test_policy_check_on_dev_zero_and_fifo_ends_at_once(tmp_path):
    fifo = tmp_path / "p.toml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        r = subprocess.run([sys.executable, "-m", "kvmgate", "policy", "check", path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and path in r.stderr and "not a regular file" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


# --- policy files: wrong shapes, bad numbers -------------------------------------------------

@pytest.mark.parametrize("text,where", [
    ("policy = 5", "p.toml:1: policy"),
    ("policy = []", "p.toml:1: policy"),
    ("rule = [1, 2]", "p.toml:1: rule 1"),
    ("[[rule]]\nmsr = 0x10\naccess = ['read']\naction = 'deny'", "p.toml:3: rule 1.access"),
    ("[[rule]]\nmsr = 0x10\naction = ['deny']", "p.toml:3: rule 1.action"),
    ("[[rule]]\nmsr = [0x10]\naction = 'deny'", "p.toml:2: rule 1.msr"),
    ("[[rule]]\nmsrs = [[0x10]]\naction = 'deny'", "p.toml:2: rule 1.msrs"),
    ("[[rule]]\nrange = {a = 1}\naction = 'deny'", "p.toml:2: rule 1.range"),
    ("[[rule]]\nmsr = 0x10\naction = 'deny'\ncomment = 5", "p.toml:4: rule 1.comment"),
    ("unknown = 'gp'", "p.toml:1: unknown"),
    ("[[invalid]]\naction = 'gp'", "p.toml:1: invalid"),
    ("[policy]\nname = 5", "p.toml:2: policy.name"),
    ("[policy]\naudit_rate = nan", "p.toml:2: policy.audit_rate"),
    ("[policy]\naudit_rate = inf", "p.toml:2: policy.audit_rate"),
    ("[policy]\naudit_rate = -1", "p.toml:2: policy.audit_rate"),
    ("[policy]\naudit_rate = 0", "p.toml:2: policy.audit_rate"),
    ("[policy]\naudit_rate = '20'", "p.toml:2: policy.audit_rate"),
    ("[policy]\naudit_rate = " + "9" * 400, "p.toml:2: policy.audit_rate"),
    ("[policy]\naudit_burst = " + "9" * 400, "p.toml:2: policy.audit_burst"),
    ("[policy]\naudit_rate = " + "9" * 5000, "p.toml:2"),
    ("[[rule]]\nmsr = '" + "9" * 5000 + "'\naction = 'deny'", "p.toml:2: rule 1.msr"),
    ("[[rule]]\nmsr = 0x10\naction = 'constant'\nvalue = '" + "9" * 5000 + "'", "p.toml:4: rule 1.value"),
    ("a = " + "[" * 5000 + "]" * 5000, "p.toml:1"),
    ("[policy]\nx = 1\n" + "a = " + "{b = " * 2000 + "1" + "}" * 2000, "p.toml"),
])
def test_wrong_shapes_and_numbers_are_located(text, where):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.toml")
    assert str(e.value).startswith(where), str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_audit_rate_accepts_finite_positive_numbers():
    assert parse_policy("[policy]\naudit_rate = 0.5").audit_rate == 0.5
    assert parse_policy("[policy]\naudit_rate = 1000").audit_rate == 1000.0


def test_policy_file_not_utf8_names_line(tmp_path):
    f = tmp_path / "p.toml"
    f.write_bytes(b"[policy]\nname = 'caf\xe9'\n")
    with pytest.raises(UserError, match="not UTF-8") as e:
        load_policy(f)
    assert e.value.where == f"{f}:2"


# --- guest files -----------------------------------------------------------------------------

def test_guest_files(tmp_path):
    (tmp_path / "ok.S").write_text("mov ecx, 0x10 ; a comment, as README says\nrdmsr # gas too\nhlt\n")
    assert load_guest(tmp_path / "ok.S") == bytes.fromhex("b910000000") + b"\x0f\x32\xf4"
    (tmp_path / "u.S").write_text("mov ecx, 0x10\nhlt ; é\n")
    with pytest.raises(UserError, match="not ASCII") as e:
        load_guest(tmp_path / "u.S")
    assert e.value.where == f"{tmp_path / 'u.S'}:2"
    (tmp_path / "big.bin").write_bytes(b"\x90" * (MAX_PROGRAM + 1))
    with pytest.raises(InputFileError, match="at most"):
        load_guest(tmp_path / "big.bin")
    (tmp_path / "g.exe").write_bytes(b"\xf4")
    with pytest.raises(GuestFileError, match="suffix"):
        load_guest(tmp_path / "g.exe")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(GuestFileError, match="empty"):
        load_guest(tmp_path / "empty.bin")
    (tmp_path / "e.S").write_text("mov ecx, 0x10\n\nfrobnicate eax\n")
    with pytest.raises(AsmError, match="frobnicate") as e:
        load_guest(tmp_path / "e.S")
    assert e.value.where == f"{tmp_path / 'e.S'}:3"


def test_absolute_operands_and_labels_are_placed_at_the_load_address():
    code = assemble("mov r13, [0x100000]\nagain: jmp again\nlea rax, [rip + again]\njmp 0x8000", CODE)
    assert code[:8] == bytes.fromhex("4c8b2c2500001000")          # [disp32] absolute, no RIP
    assert code[8:10] == b"\xeb\xfe"                               # again: jmp again
    assert code[10:17] == bytes.fromhex("488d05f7ffffff")          # rip + again = 0x10008
    assert int.from_bytes(code[18:22], "little", signed=True) == 0x8000 - (CODE + 22)
    assert assemble('.ascii "a;b"\n', CODE) == b"a;b"             # ; inside a string stays


@pytest.mark.parametrize("text", [".space 0x7fffffff", ".align 0x40000000", ".fill 0x7fffffff, 8, 0",
                                  ".rept 100000000\nnop\n.endr"])
def test_assembler_refuses_programs_that_ask_too_much(text):
    t = time.monotonic()
    with pytest.raises(AsmError):
        assemble(text + "\nhlt\n", CODE, "g.S", MAX_PROGRAM)
    assert not [n for n in os.listdir("/tmp") if n.startswith("kvmgate-asm-") and
                os.path.getmtime(os.path.join("/tmp", n)) >= t - 1]


# --- CLI arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,what", [
    (["--vcpus", "0"], "--vcpus"), (["--vcpus", "65"], "--vcpus"), (["--vcpus", "x"], "--vcpus"),
    (["--timeout", "inf"], "--timeout"), (["--timeout", "-1"], "--timeout"),
    (["--timeout", "nan"], "--timeout"), (["--timeout", "0"], "--timeout"),
    (["--audit", "{tmp}/missing/a.jsonl"], "does not exist"), (["--audit", "{tmp}"], "is a directory"),
    (["--audit", "{fifo}"], "regular file"),
])
def test_run_arguments_refused_before_anything_runs(tmp_path, capsys, args, what):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [a.format(tmp=tmp_path, fifo=fifo) for a in args]
    assert main(["run", str(tmp_path / "never-read.S"), *args]) == 2
    err = capsys.readouterr().err
    assert what in err and "never-read" not in err and len(err.strip().splitlines()) == 1


def test_learn_arguments_refused(tmp_path, capsys):
    assert main(["learn", "g.S", "--out", str(tmp_path / "no" / "p.toml")]) == 2
    assert main(["learn", "g.S", "--out", str(tmp_path / "p.toml"), "--vcpus", "65"]) == 2
    assert main(["learn", "g.S", "--out", str(tmp_path / "p.toml"), "--limit", "-1"]) == 2
    assert not list(tmp_path.iterdir())
