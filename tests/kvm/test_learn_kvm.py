"""kvmgate.learn on the running kernel: learn a guest's policy with both recorders, re-run the
guest under it (Machine.set_policy + audit): nothing it used is denied; tightened by one MSR,
exactly that one is denied."""
import io
import re
from pathlib import Path

import pytest

import kvmgate.learn.record
from kvmgate.audit import AuditLog
from kvmgate.errors import UserError
from kvmgate.kvm import Kvm
from kvmgate.learn import GUARDED_MSRS, learn
from kvmgate.machine import Machine
from kvmgate.msr.model import WRITE, KernelMsr
from kvmgate.policy import compile_policy, parse_policy
from kvmgate.probe import Access, MsrProber
from kvmgate.trace import TracefsError, policy_decider, replay

pytestmark = pytest.mark.kvm

PROBE = Path(__file__).resolve().parents[2] / "kvmgate" / "examples" / "probe.S"
RECORDERS = ["tracefs", "exits"]


def run(guest, policy_text=None):
    """Run `guest` (under the policy): (RunResult, AuditLog, {(index, write): #GPs})."""
    audit = AuditLog(io.StringIO(), rate=1e9, burst=1 << 20)
    with Machine(guest) as m:
        if policy_text is not None:
            m.set_policy(parse_policy(policy_text, "<learned>"), audit)
        r = m.run(timeout=60)
        gps = {}
        for f in r.gp_faults:                     # RDMSR is 0f 32, WRMSR 0f 30
            key = (f.index, m.read_mem(f.rip, 2) == b"\x0f\x30")
            gps[key] = gps.get(key, 0) + 1
    return r, audit, gps


def decisions(audit, action=None):
    out = {}
    for (index, write, act, _), n in audit.counts.items():
        if action is None or act == action:
            out[(index, write)] = out.get((index, write), 0) + n
    return out


def strip(text):
    """Policy text without comments (headers and value notes differ between runs)."""
    return re.sub(r"(?m)^#.*\n", "", re.sub(r"(?m)\s*#.*$", "", text))


def keys(accesses):
    return {(a.index, a.write) for a in accesses}


# ---- a guest with a few hundred MSRs KVM completes

def _candidates():
    with Kvm() as k:
        listed = set(k.msr_index_list()) | set(k.msr_feature_index_list())
    s = set(listed)
    s |= {0xFE, 0x250, 0x258, 0x259, 0x2FF} | set(range(0x200, 0x210)) | set(range(0x268, 0x270))
    s |= {0x179, 0x17A, 0x17B} | set(range(0x400, 0x480))            # MCG, MC0..MC31
    s |= set(range(0x0, 0x1000)) | set(range(0xC0000000, 0xC0000200))
    s |= set(range(0xC0010000, 0xC0011100)) | set(range(0x4B564D00, 0x4B564E00))
    return sorted(s), sorted(listed)


@pytest.fixture(scope="module")
def wide():
    """(asm, expected {(index, write)}): read every MSR KVM completes (MsrProber.classify, no
    filter), write back what was read where KVM takes that, write 0 to the few listed MSRs that
    are write-only; checked by a run with no filter: no #GP at all."""
    cands, listed = _candidates()
    with MsrProber() as p:
        kinds = p.classify([Access(i) for i in cands])
    readable = [i for i, k in zip(cands, kinds) if k is KernelMsr.HANDLED]
    with MsrProber() as p:
        values = p.machine.get_msrs(readable)
        kinds = p.classify([Access(i, WRITE, values.get(i, 0)) for i in readable])
        writable = {i for i, k in zip(readable, kinds) if k is KernelMsr.HANDLED}
        wonly = [i for i in listed if i not in set(readable)]
        kinds = p.classify([Access(i, WRITE, 0) for i in wonly])
        write_only = {i for i, k in zip(wonly, kinds) if k is KernelMsr.HANDLED}
    for _ in range(5):
        lines = []
        for i in sorted(set(readable) | write_only):
            if i in write_only:
                lines += [f"mov ecx, {i:#x}", "xor eax, eax", "xor edx, edx", "wrmsr"]
            else:
                lines += [f"mov ecx, {i:#x}", "rdmsr"] + (["wrmsr"] if i in writable else [])
        asm = "\n".join(lines + ["hlt"])
        r, _, gps = run(asm)
        if not gps:
            expected = ({(i, False) for i in readable} | {(i, True) for i in writable}
                        | {(i, True) for i in write_only})
            return asm, expected
        writable -= {i for i, w in gps if w}
        write_only -= {i for i, w in gps if w}
        readable = [i for i in readable if (i, False) not in gps]
    pytest.fail(f"could not build a guest without #GP: {gps}")


@pytest.fixture(scope="module")
def learned(wide):
    asm, _ = wide
    return {rec: learn(asm, recorder=rec) for rec in RECORDERS}


def test_wide_guest_has_a_few_hundred_msrs(wide):
    _, expected = wide
    assert len({i for i, _ in expected}) >= 150 and len(expected) >= 250


@pytest.mark.parametrize("recorder", RECORDERS)
def test_wide_guest_learned_policy_denies_nothing(wide, learned, recorder):
    asm, expected = wide
    res = learned[recorder]
    assert res.recorder == recorder and res.halted and res.gp_faults == 0
    assert keys(res.allowed()) == expected and not res.refused()
    assert res.events == len(expected)
    text = res.policy_text()
    assert text.count("[[rule]]") < 30                  # grouped, not one rule per MSR
    assert 'range = ["IA32_MC0_CTL", "IA32_MC31_MISC"]' in text or 0x400 not in {i for i, _ in expected}
    r, audit, gps = run(asm, text)
    assert gps == {} and r.msr_exits == [] and decisions(audit) == {}


def test_both_recorders_learn_the_same_policy(learned):
    texts = {rec: strip(res.policy_text()) for rec, res in learned.items()}
    assert texts["tracefs"] == texts["exits"]


@pytest.mark.parametrize("recorder", RECORDERS)
def test_tightened_by_one_msr_denies_exactly_it(wide, learned, recorder):
    asm, expected = wide
    res = learned[recorder]
    text = res.policy_text()
    # remove one named MSR read and written from an msrs list, by editing the text
    both = re.search(r'access = "both"\naction = "allow"\nmsrs = \[\n((?:    .*\n)+)\]', text)
    line = both.group(1).splitlines()[len(both.group(1).splitlines()) // 2]
    index = int(re.search(r"# (0x[0-9a-f]+):", line).group(1), 16)
    tightened = text.replace(line + "\n", "", 1)
    r, audit, gps = run(asm, tightened)
    assert decisions(audit, "deny") == decisions(audit) == {(index, False): 1, (index, True): 1}
    assert gps == {(index, False): 1, (index, True): 1}
    # one direction of a range member, through the API
    member = 0x205 if (0x205, True) in expected else sorted(expected)[len(expected) // 2][0]
    r, audit, gps = run(asm, res.policy_text(exclude=[(member, True)]))
    assert decisions(audit) == {(member, True): 1} and gps == {(member, True): 1}


def test_guarded_msrs_under_tracefs_learn_the_same(wide, learned):
    """Forcing the pass-through guard (needed on VMX/SVM; kvm_pvm traps everything) changes
    how some MSRs are recorded, not what is learned."""
    asm, expected = wide
    res = learn(asm, recorder="tracefs", guard=True)
    assert res.guarded == GUARDED_MSRS and keys(res.allowed()) == expected
    fwd = {(a.index, a.write) for a in res.accesses if a.forwarded}
    assert fwd == {k for k in expected if k[0] in GUARDED_MSRS} and fwd
    assert all(a.check == "handled" for a in res.accesses if a.forwarded)
    assert strip(res.policy_text()) == strip(learned["tracefs"].policy_text())


# ---- the bundled probe guest: it also makes accesses KVM fails

@pytest.mark.parametrize("recorder", RECORDERS)
def test_probe_guest(recorder, tmp_path):
    _, _, base_gps = run(PROBE.read_text())
    assert base_gps                                     # 0x12345678 at least
    res = learn(str(PROBE), recorder=recorder)
    assert res.guest == str(PROBE) and res.gp_faults == sum(base_gps.values())
    assert keys(res.refused()) == set(base_gps)
    assert {(0x10, False), (0xC0000080, False), (0xC0000082, True)} <= keys(res.allowed())
    lstar = res.access(0xC0000082, True)
    assert lstar.events == 2 and lstar.values == (0xDEADBEEF, 0xFFFFFFFF81A00000)
    text = res.policy_text()
    for i, w in base_gps:
        assert re.search(rf"^#\s+{i:#x} .* {'write' if w else 'read'}", text, re.M)
    # re-run: the guest gets the same #GPs as with no policy, each a logged default deny
    r, audit, gps = run(PROBE.read_text(), text)
    assert gps == base_gps
    assert decisions(audit) == decisions(audit, "deny") == base_gps
    # the recorded trace replays to the same verdicts
    cp = compile_policy(parse_policy(text))
    rep = replay(res.trace, policy_decider(cp))
    assert {(x.index, x.write) for x in rep.rows if x.verdict() == "deny"} == set(base_gps)
    assert {x.verdict() for x in rep.rows} == {"kernel", "deny"}


def test_exits_recorder_does_not_trust_host_initiated_access():
    """KVM_GET_MSRS succeeds for MSRs the guest's own RDMSR fails (e.g. advertised feature
    MSRs the vCPU lacks): the exits recorder re-checks them as guest accesses."""
    with Kvm() as k:
        listed = k.msr_index_list()
    with MsrProber() as p:
        kinds = p.classify([Access(i) for i in listed])
        got = p.machine.get_msrs(listed)
    lenient = [i for i, k in zip(listed, kinds) if k is not KernelMsr.HANDLED and i in got]
    if not lenient:
        pytest.skip("no MSR that KVM_GET_MSRS reads but the guest cannot")
    asm = "\n".join(f"mov ecx, {i:#x}\nrdmsr" for i in [0x10] + lenient) + "\nhlt"
    _, _, base = run(asm)
    assert set(base) == {(i, False) for i in lenient}
    checked = learn(asm, recorder="exits")
    assert keys(checked.refused()) == set(base) and keys(checked.allowed()) == {(0x10, False)}
    assert all("KVM_GET_MSRS worked" in a.why_not() for a in checked.refused())
    assert keys(learn(asm, recorder="tracefs").refused()) == set(base)
    trusting = learn(asm, recorder="exits", verify=False)
    assert not trusting.refused()                       # what verify=True protects against


def test_timeout_learns_what_ran(tmp_path):
    res = learn("again:\nmov ecx, 0x10\nrdmsr\njmp again\n", recorder="exits", timeout=0.5)
    assert not res.halted and res.gp_faults is None and keys(res.allowed()) == {(0x10, False)}
    assert any("did not halt" in n for n in res.notes)
    assert "stopped at the timeout" in res.policy_text()


def test_recorder_choice_and_fallback(monkeypatch):
    class Broken:
        def __init__(self, *a, **kw):
            pass

        def start(self):
            raise TracefsError("tracefs is not mounted (test)")

    monkeypatch.setattr(kvmgate.learn.record, "Recording", Broken)
    res = learn("mov ecx, 0x10\nrdmsr\nhlt", recorder="auto")
    assert res.recorder == "exits" and any("tracefs unavailable" in n for n in res.notes)
    assert keys(res.allowed()) == {(0x10, False)}
    with pytest.raises(UserError, match="not mounted"):
        learn("hlt", recorder="tracefs")
    with pytest.raises(UserError, match="recorder"):
        learn("hlt", recorder="nope")


def test_multi_vcpu_guest():
    asm = "mov ecx, 0x10\nrdmsr\ncmp edi, 1\njne done\nmov ecx, 0x1b\nrdmsr\ndone:\nhlt"
    for rec in RECORDERS:
        m = learn(asm, recorder=rec, vcpus=2)
        assert keys(m.allowed()) == {(0x10, False), (0x1B, False)}
        assert m.access(0x10, False).events == 2 and m.access(0x1B, False).events == 1
