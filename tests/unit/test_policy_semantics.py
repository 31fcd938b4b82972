"""What a policy means once parsed and compiled, and what its actions do, against hand-written
expectations (the README's policy section and docs/kvm-msr.md): results, not "no exception"."""
import io
import json

import pytest

from kvmgate.audit import AuditLog
from kvmgate.errors import InjectGP, PolicyError
from kvmgate.msr import names
from kvmgate.msr.model import (DEFAULT_ALLOW, EXIT_REASON_FILTER, EXIT_REASON_INVAL,
                               EXIT_REASON_UNKNOWN, READ, WRITE, MsrFilter, MsrRange)
from kvmgate.policy import compile_policy, parse_policy
from kvmgate.policy.handlers import Registers, make_handler, perform

M64 = (1 << 64) - 1


def compiled(text: str, **kw):
    return compile_policy(parse_policy(text, "p.toml"), **kw)


def verdicts(cp, msrs):
    """{(msr, 'r'|'w'): filter allows} for the given MSRs."""
    return {(i, a): cp.filter.allows(i, {"r": READ, "w": WRITE}[a]) for i in msrs for a in "rw"}


# ---- [policy] default ---------------------------------------------------------------------

def test_missing_default_means_deny():
    p = parse_policy("[[rule]]\nmsr = 0x10\naction = 'allow'\n", "p.toml")
    assert p.default == "deny"
    cp = compile_policy(p)
    assert cp.filter.default_deny
    assert verdicts(cp, [0x10, 0x1A0, 0xC0000080]) == {
        (0x10, "r"): True, (0x10, "w"): True, (0x1A0, "r"): False, (0x1A0, "w"): False,
        (0xC0000080, "r"): False, (0xC0000080, "w"): False}
    assert cp.exit_mask == EXIT_REASON_FILTER            # denials are logged by default
    assert cp.default_action.kind == "deny" and cp.default_action.log


def test_empty_policy_file_denies_everything_but_x2apic():
    cp = compiled("")
    assert cp.filter.default_deny
    assert not cp.filter.allows(0x10, READ) and not cp.filter.allows(0xFFFFFFFF, WRITE)
    assert cp.filter.allows(0x830, WRITE)                 # docs/kvm-msr.md §3 (x2APIC)
    cp.filter.validate()                                  # DEFAULT_DENY needs a non-empty range


def test_default_allow_without_rules_installs_no_exits():
    cp = compiled("[policy]\ndefault = 'allow'\n")
    assert not cp.filter.default_deny and cp.exit_mask == 0 and len(cp.actions) == 0
    assert cp.default_action is None
    assert all(cp.filter.allows(i, a) for i in (0, 0x10, 0x1A0, 0xC0000082) for a in (READ, WRITE))


def test_default_log_false_turns_filter_exits_off_for_plain_denials():
    cp = compiled("[policy]\ndefault = 'deny'\nlog = false\n[[rule]]\nmsr = 0x10\naction = 'allow'\n")
    assert cp.exit_mask == 0 and not cp.default_action.log


# ---- rules ----------------------------------------------------------------------------------

def test_one_msr_range_is_accepted_as_that_msr():
    p = parse_policy("[[rule]]\nrange = [0x10, 0x10]\naction = 'allow'\n", "p.toml")
    assert [(r.lo, r.hi) for r in p.rules] == [(0x10, 0x10)]
    cp = compile_policy(p)
    assert verdicts(cp, [0xF, 0x10, 0x11]) == {
        (0xF, "r"): False, (0xF, "w"): False, (0x10, "r"): True, (0x10, "w"): True,
        (0x11, "r"): False, (0x11, "w"): False}


def test_inclusive_range_covers_both_ends():
    cp = compiled("[policy]\ndefault='allow'\n[[rule]]\nrange = [0x186, 0x189]\naccess='write'\naction='deny'\n")
    assert [cp.filter.allows(i, WRITE) for i in range(0x185, 0x18B)] == [True, False, False, False, False, True]
    assert all(cp.filter.allows(i, READ) for i in range(0x185, 0x18B))


def test_identical_overlap_compiles_to_one_denial():
    cp = compiled("[policy]\ndefault='allow'\n[[rule]]\nrange=[0x10,0x20]\naction='deny'\n"
                  "[[rule]]\nmsr=0x18\naction='deny'")
    assert [cp.filter.allows(i, READ) for i in (0xF, 0x10, 0x18, 0x20, 0x21)] == [True, False, False, False, True]
    assert {k for k, _ in cp.actions.items()} == {i << 1 | w for i in range(0x10, 0x21) for w in (0, 1)}
    assert {a.kind for _, a in cp.actions.items()} == {"deny"}


def test_allowing_an_x2apic_msr_is_a_no_op():
    base = "[policy]\ndefault='deny'\n[[rule]]\nmsr=0x10\naction='allow'\n"
    with_x2apic = compiled(base + "[[rule]]\nmsr=0x830\naction='allow'\n")
    without = compiled(base)
    assert with_x2apic.filter == without.filter
    assert list(with_x2apic.actions.items()) == list(without.actions.items()) == []
    assert with_x2apic.warnings == []


def test_access_words_pick_directions():
    cp = compiled("[policy]\ndefault='allow'\n"
                  "[[rule]]\nmsr=0x10\naccess='read'\naction='deny'\n"
                  "[[rule]]\nmsr=0x11\naccess='write'\naction='deny'\n"
                  "[[rule]]\nmsr=0x12\naction='deny'\n")
    assert verdicts(cp, [0x10, 0x11, 0x12]) == {
        (0x10, "r"): False, (0x10, "w"): True, (0x11, "r"): True, (0x11, "w"): False,
        (0x12, "r"): False, (0x12, "w"): False}


def test_allow_with_log_goes_to_user_space_as_a_forward():
    cp = compiled("[policy]\ndefault='allow'\n[[rule]]\nmsr=0x10\naccess='read'\naction='allow'\nlog=true\n")
    assert not cp.filter.allows(0x10, READ) and cp.filter.allows(0x10, WRITE)
    assert cp.actions[0x10 << 1].kind == "forward" and cp.actions[0x10 << 1].log
    assert cp.exit_mask == EXIT_REASON_FILTER


# ---- [unknown] / [invalid] ----------------------------------------------------------------

@pytest.mark.parametrize("table,bit", [("unknown", EXIT_REASON_UNKNOWN), ("invalid", EXIT_REASON_INVAL)])
def test_failure_tables(table, bit):
    allow = "[policy]\ndefault='allow'\n"
    plain = compiled(allow + f"[{table}]\naction='gp'\n")
    assert plain.exit_mask == 0 and getattr(plain, table) is None          # the kernel's #GP
    logged = compiled(allow + f"[{table}]\naction='gp'\nlog=true\n")
    act = getattr(logged, table)
    assert logged.exit_mask == bit and (act.kind, act.log, act.rule) == ("deny", True, f"[{table}]")
    ignored = compiled(allow + f"[{table}]\naction='ignore'\n")
    act = getattr(ignored, table)
    assert ignored.exit_mask == bit and (act.kind, act.log) == ("ignore", False)


def test_unknown_ignore_compiles_on_a_host_without_ignore_msrs():
    cp = compiled("[policy]\ndefault='allow'\n[unknown]\naction='ignore'\n", host_ignore_msrs=False)
    assert cp.unknown.kind == "ignore" and cp.exit_mask == EXIT_REASON_UNKNOWN and cp.warnings == []


def test_unknown_ignore_on_ignore_msrs_host_with_warn_keeps_the_action():
    with pytest.warns(UserWarning, match="ignore_msrs=Y"):
        cp = compiled("[policy]\ndefault='allow'\nhost_ignore_msrs='warn'\n[unknown]\naction='ignore'\n",
                      host_ignore_msrs=True)
    assert cp.unknown.kind == "ignore" and len(cp.warnings) == 1


# ---- what the actions do to one exit (the handler the policy installs) ---------------------

class FakeVcpu:
    """Host-initiated access that succeeds for 0x10 (reads 0x5555) and fails for others."""

    def __init__(self):
        self.done = []

    def host_msr_access(self, index, write, value=0):
        self.done.append((index, write, value))
        if index != 0x10:
            return None
        return value if write else 0x5555

    def get_regs(self):
        class R:
            rip = 0x10042
        return R()


class FakeMachine:
    def __init__(self):
        self.vcpus = [FakeVcpu()]


class Exit:
    """An MSR exit made by hand with kvmgate.exits.MsrExit's handler context (registers on
    demand, a host-initiated access) answered by a FakeVcpu (one per FakeMachine)."""
    machine = None

    def __init__(self, index, is_write, data=0, reason=EXIT_REASON_FILTER, vcpu=0):
        self.index, self.is_write, self.data, self.reason, self.vcpu = index, is_write, data, reason, vcpu
        self._cpu = (Exit.machine or FakeMachine()).vcpus[vcpu]

    def regs(self):
        return self._cpu.get_regs()

    def host_access(self, value=None):
        return self._cpu.host_msr_access(self.index, self.is_write, self.data if value is None else value)


def handler_for(text, audit=None):
    m = Exit.machine = FakeMachine()
    return make_handler(compiled(text), audit), m


ALLOW = "[policy]\ndefault='allow'\nlog=false\n"


def test_deny_and_default_deny_inject_gp():
    h, _ = handler_for("[policy]\ndefault='deny'\n[[rule]]\nmsr=0x10\naction='deny'\n")
    assert h(Exit(0x10, False)) is InjectGP
    assert h(Exit(0x1A0, True, 5)) is InjectGP


def test_ignore_reads_zero_and_drops_writes():
    h, _ = handler_for(ALLOW + "[[rule]]\nmsr=0x10\naction='ignore'\n")
    assert h(Exit(0x10, False)) == 0
    assert h(Exit(0x10, True, 7)) is None


@pytest.mark.parametrize("writes,expect", [("ignore", None), ("gp", InjectGP)])
def test_constant(writes, expect):
    h, _ = handler_for(ALLOW + f"[[rule]]\nmsr=0x35\naction='constant'\nvalue=0x10001\nwrites='{writes}'\n")
    assert h(Exit(0x35, False)) == 0x10001
    assert h(Exit(0x35, True, 3)) is expect
    assert h(Exit(0x35, False)) == 0x10001        # a write never changes a constant


def test_emulate_write_mask_and_store():
    h, _ = handler_for(ALLOW + "[[rule]]\nmsr=0x10\naction='emulate'\ninitial=0x100\nwrite_mask=0xff\n")
    assert h(Exit(0x10, False)) == 0x100
    assert h(Exit(0x10, True, 0x1AB)) is None          # bit 8 unchanged, low byte may change
    assert h(Exit(0x10, False)) == 0x1AB
    assert h(Exit(0x10, True, 0x0AB)) is InjectGP      # clears bit 8: outside write_mask
    assert h(Exit(0x10, True, 0x1AB | 1 << 63)) is InjectGP
    assert h(Exit(0x10, False)) == 0x1AB               # a refused write stores nothing


def test_emulate_allowed_values():
    h, _ = handler_for(ALLOW + "[[rule]]\nmsr=0x10\naction='emulate'\nallowed=[1, 3]\n")
    assert h(Exit(0x10, False)) == 0
    assert h(Exit(0x10, True, 3)) is None
    assert h(Exit(0x10, True, 2)) is InjectGP
    assert h(Exit(0x10, False)) == 3


def test_emulated_registers_are_per_msr():
    h, _ = handler_for(ALLOW + "[[rule]]\nmsrs=[0x10, 0x11]\naction='emulate'\ninitial=4\n")
    assert h(Exit(0x10, True, 9)) is None
    assert (h(Exit(0x10, False)), h(Exit(0x11, False))) == (9, 4)


def test_forward_carries_out_the_access_host_initiated():
    h, m = handler_for(ALLOW + "[[rule]]\nmsrs=[0x10, 0x11]\naction='allow'\nlog=true\n")
    assert h(Exit(0x10, False)) == 0x5555
    assert h(Exit(0x10, True, 0x77)) is None
    assert h(Exit(0x11, False)) is InjectGP            # KVM refused the host-initiated access
    assert m.vcpus[0].done == [(0x10, False, 0), (0x10, True, 0x77), (0x11, False, 0)]


def test_exit_reasons_pick_their_table():
    h, _ = handler_for(ALLOW + "[[rule]]\nmsr=0x10\naction='constant'\nvalue=1\n"
                       "[unknown]\naction='ignore'\n[invalid]\naction='gp'\nlog=true\n")
    assert h(Exit(0x10, False)) == 1
    assert h(Exit(0x10, False, reason=EXIT_REASON_UNKNOWN)) == 0      # not the 0x10 rule
    assert h(Exit(0x10, False, reason=EXIT_REASON_INVAL)) is InjectGP
    assert h(Exit(0x10, False, reason=0x80)) is InjectGP              # no such reason


def test_unlisted_reason_without_table_is_gp():
    h, _ = handler_for(ALLOW + "[[rule]]\nmsr=0x10\naction='constant'\nvalue=1\n")
    assert h(Exit(0x99, False, reason=EXIT_REASON_UNKNOWN)) is InjectGP
    assert h(Exit(0x99, False, reason=EXIT_REASON_INVAL)) is InjectGP


def test_logged_actions_are_recorded_and_unlogged_ones_counted():
    buf = io.StringIO()
    audit = AuditLog(buf, clock=lambda: 5.0)
    h, _ = handler_for("[policy]\ndefault='deny'\n"
                       "[[rule]]\nmsr=0x35\naccess='read'\naction='constant'\nvalue=2\n"
                       "[[rule]]\nmsr=0x186\naction='ignore'\nlog=false\n"
                       "[unknown]\naction='gp'\nlog=true\n", audit)
    h(Exit(0x35, False))
    h(Exit(0x186, True, 4))
    h(Exit(0x1A0, False))
    h(Exit(0x4B564D00, True, 1, reason=EXIT_REASON_UNKNOWN))
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(r["msr"], r["access"], r["value"], r["reason"], r["action"], r["result"], r["rip"], r["rule"])
            for r in recs] == [
        ("0x35", "read", "0x0", "FILTER", "constant", "read 0x2", "0x10042", "p.toml:3 (rule 1)"),
        ("0x1a0", "read", "0x0", "FILTER", "deny", "#GP", "0x10042", "[policy] default"),
        ("0x4b564d00", "write", "0x1", "UNKNOWN", "deny", "#GP", "0x10042", "[unknown]")]
    assert {(s["msr"], s["action"], s["result"]): s["count"] for s in audit.summary()} == {
        ("0x35", "constant", "read 0x2"): 1, ("0x186", "ignore", "dropped"): 1,
        ("0x1a0", "deny", "#GP"): 1, ("0x4b564d00", "deny", "#GP"): 1}


def test_a_wide_range_rule_answers_every_msr_it_covers():
    """A rule over more than ActionTable.SHORT MSRs is kept as a span, not per MSR: the handler
    must find it for an MSR in the middle and at both ends, and not past them."""
    h, _ = handler_for(ALLOW + "[[rule]]\nmsr=0x10\naction='constant'\nvalue=1\n"
                       "[[rule]]\nrange=[0x40000000, 0x400000ff]\naction='constant'\nvalue=7\n")
    for msr in (0x40000000, 0x40000080, 0x400000FF):
        assert h(Exit(msr, False)) == 7
        assert h(Exit(msr, True, 1)) is None               # a constant drops writes
    assert h(Exit(0x10, False)) == 1
    assert h(Exit(0x40000100, False)) is InjectGP          # no action: the filter's own #GP


def test_a_record_whose_registers_cannot_be_read_has_no_rip():
    """exit.regs() failing (KVM_GET_REGS refused) must not lose the record: rip is null."""
    from kvmgate.errors import KvmError

    class NoRegs(Exit):
        def regs(self):
            raise KvmError(5, "KVM_GET_REGS", "vcpu0")

    buf = io.StringIO()
    h, _ = handler_for("[policy]\ndefault='deny'\n", AuditLog(buf, clock=lambda: 5.0))
    assert h(NoRegs(0x1A0, False)) is InjectGP
    (rec,) = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert rec["rip"] is None and rec["msr"] == "0x1a0" and rec["result"] == "#GP"


def test_bind_gives_the_filter_the_exit_mask_and_a_handler_that_carries_registers():
    """CompiledPolicy.bind (what Machine.set_policy installs): the compiled filter and exit
    mask, a handler for this policy, and the emulated registers, carried into the next bind
    only when given as `carry`; Policy.bind compiles first."""
    Exit.machine = FakeMachine()
    text = ALLOW + "[[rule]]\nmsr=0x10\naction='emulate'\ninitial=4\nlog=true\n"
    cp = compiled(text)
    b = cp.bind(None)
    assert b.filter is cp.filter and b.exit_mask == cp.exit_mask and b.policy is cp
    assert b.handler(Exit(0x10, True, 9)) is None
    assert cp.bind(None, carry=b.carry).handler(Exit(0x10, False)) == 9     # carried over
    assert cp.bind(None).handler(Exit(0x10, False)) == 4                   # a fresh start
    assert cp.bind(None, carry="not registers").handler(Exit(0x10, False)) == 4
    buf = io.StringIO()
    logged = cp.bind(None, AuditLog(buf, clock=lambda: 5.0))
    assert logged.handler(Exit(0x10, False)) == 4
    (rec,) = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert (rec["msr"], rec["action"], rec["result"]) == ("0x10", "emulate", "read 0x4")
    pb = parse_policy(text, "p.toml").bind(None)
    assert pb.exit_mask == cp.exit_mask and pb.filter.ranges == cp.filter.ranges
    assert pb.handler(Exit(0x10, False)) == 4


# ---- the result text each action gives the audit log ---------------------------------------

PERFORM_POLICY = (ALLOW + "[[rule]]\nmsr=0x20\naction='ignore'\n"
                  "[[rule]]\nmsr=0x21\naction='constant'\nvalue=0x2a\nwrites='gp'\n"
                  "[[rule]]\nmsr=0x22\naction='constant'\nvalue=0x2b\n"
                  "[[rule]]\nmsr=0x23\naction='emulate'\ninitial=0x7\nwrite_mask=0xf0\n"
                  "[[rule]]\nmsr=0x24\naction='emulate'\nallowed=[0x1]\n"
                  "[[rule]]\nmsrs=[0x10, 0x11]\naction='allow'\nlog=true\n"
                  "[[rule]]\nmsr=0x25\naction='deny'\n")


@pytest.mark.parametrize("index,write,data,reply,result", [
    (0x20, False, 0, 0, "read 0x0"),
    (0x20, True, 5, None, "dropped"),
    (0x21, False, 0, 0x2A, "read 0x2a"),
    (0x21, True, 5, InjectGP, "#GP"),
    (0x22, True, 5, None, "dropped"),
    (0x23, False, 0, 0x7, "read 0x7"),
    (0x23, True, 0x37, None, "written"),
    (0x23, True, 0x38, InjectGP, "#GP"),          # bit 3 is outside write_mask
    (0x24, True, 0x2, InjectGP, "#GP"),           # not an allowed value
    (0x24, True, 0x1, None, "written"),
    (0x10, False, 0, 0x5555, "read 0x5555"),
    (0x10, True, 9, None, "written"),
    (0x11, True, 9, InjectGP, "#GP"),             # KVM refused the host-initiated write
    (0x25, False, 0, InjectGP, "#GP"),
])
def test_perform_reply_and_result(index, write, data, reply, result):
    cp = compiled(PERFORM_POLICY)
    act = cp.actions[index << 1 | write]
    got = perform(act, Exit(index, write, data), Registers())
    assert got == (reply, result)


def test_an_unknown_action_kind_cannot_be_made():
    from dataclasses import replace
    with pytest.raises(ValueError):
        replace(compiled(PERFORM_POLICY).actions[0x25 << 1], kind="no-such-action")


# ---- compile errors say what and where; limits are exact -----------------------------------



def compile_error(text: str) -> str:
    with pytest.raises(PolicyError) as ei:
        compiled(text)
    return str(ei.value)


def test_a_wide_range_costs_one_filter_range_per_0x3000_msrs():
    # no size limit of its own any more (issue 10: compile cost per rule, not per MSR): a deny
    # over 0x100001 MSRs under default allow needs ceil(0x100001 / 0x3000) = 86 kernel ranges
    assert compile_error("[policy]\ndefault='allow'\n[[rule]]\nrange=[0x1000,0x101000]\naction='deny'") == (
        "p.toml: needs 86 filter ranges, the kernel takes 16 (each at most 0x3000 MSRs wide): the "
        "listed MSRs are spread too far apart; flip the default (now 'allow') or list fewer distant MSRs")


@pytest.mark.parametrize("access,word", [("write", "writes"), ("read", "reads")])
def test_contradiction_message(access, word):
    text = (f"[[rule]]\nmsr=0x10\naccess='{access}'\naction='deny'\n"
            "[[rule]]\nrange=[0x10,0x11]\naction='allow'")
    assert compile_error(text) == (
        f"p.toml:5 (rule 2): contradicts p.toml:1 (rule 1) for {word} of IA32_TSC (deny vs allow); "
        "remove one or split the ranges")


@pytest.mark.parametrize("msr", [0x800, 0x8FF])
def test_x2apic_bounds_and_message(msr):
    assert compile_error(f"[[rule]]\nmsr={msr}\naction='deny'\nlog=true") == (
        f"p.toml:1 (rule 1): {names_describe(msr)} is an x2APIC MSR (0x800-0x8ff): KVM never "
        "filters those, so action 'deny' with log cannot be enforced; drop the rule or set "
        "[policy] x2apic = \"warn\"")
    assert "action 'ignore' cannot" in compile_error(f"[[rule]]\nmsr={msr}\naction='ignore'\nlog=false")
    assert compiled(f"[[rule]]\nmsr={msr - 1 if msr == 0x800 else msr + 1}\naction='deny'").filter


def names_describe(i):
    return names.describe(i)


def test_x2apic_warning_keeps_the_rules_after_it():
    with pytest.warns(UserWarning, match="x2APIC"):
        cp = compiled("[policy]\ndefault='allow'\nx2apic='warn'\n[[rule]]\nmsr=0x830\naction='deny'\n"
                      "[[rule]]\nmsr=0x10\naction='deny'\n")
    assert not cp.filter.allows(0x10, READ) and not cp.filter.allows(0x10, WRITE)


def test_sixteen_ranges_fit_seventeen_do_not():
    rules = "".join(f"[[rule]]\nmsr = {i * 0x10000:#x}\naction = 'deny'\n" for i in range(16))
    assert len(compiled("[policy]\ndefault='allow'\n" + rules).filter.ranges) == 16
    msg = compile_error("[policy]\ndefault='allow'\n" + rules + "[[rule]]\nmsr=0x100000\naction='deny'\n")
    assert msg.startswith("p.toml: needs 17 filter ranges") and "(now 'allow')" in msg


def test_planned_ranges_exactly():
    cp = compiled("[policy]\ndefault='allow'\n[[rule]]\nrange=[0x10,0x12]\naction='deny'\n")
    assert cp.filter == MsrFilter([MsrRange(READ | WRITE, 0x10, 3, b"\x00")], DEFAULT_ALLOW)
    # reads and writes in different windows: separate READ and WRITE ranges are fewer
    cp = compiled("[policy]\ndefault='allow'\n"
                  "[[rule]]\nmsrs=[0x0, 0x2fff]\naccess='read'\naction='deny'\n"
                  "[[rule]]\nmsrs=[0x1000, 0x3fff]\naccess='write'\naction='deny'\n")
    bits = bytearray(b"\xff" * 0x600)
    bits[0] &= 0xFE
    bits[0x5FF] &= 0x7F
    assert cp.filter == MsrFilter([MsrRange(READ, 0x0, 0x3000, bytes(bits)),
                                   MsrRange(WRITE, 0x1000, 0x3000, bytes(bits))], DEFAULT_ALLOW)


def test_action_for_invalid_only_for_inval():
    cp = compiled(ALLOW + "[invalid]\naction='ignore'\n")
    assert cp.action_for(0x10, False, EXIT_REASON_INVAL).kind == "ignore"
    assert cp.action_for(0x10, False, 8) is None
    assert cp.action_for(0x10, False, EXIT_REASON_UNKNOWN) is None


def test_handler_keeps_the_registers_it_is_given_and_reports_vcpu_and_direction():
    buf = io.StringIO()
    audit = AuditLog(buf, clock=lambda: 5.0)
    regs = Registers()
    cp = compiled(ALLOW + "[[rule]]\nmsr=0x186\naction='ignore'\n[[rule]]\nmsr=0x10\naction='deny'\nlog=true\n"
                  "[invalid]\naction='ignore'\n")
    h = make_handler(cp, audit, regs)
    assert h.registers is regs
    assert h(Exit(0x10, False, reason=EXIT_REASON_INVAL)) == 0        # [invalid] ignore
    h(Exit(0x186, True, 4))
    h(Exit(0x10, True, 1, vcpu=0))
    assert [(r["vcpu"], r["access"]) for r in map(json.loads, buf.getvalue().splitlines())] == [(0, "write")]
    assert {(s["msr"], s["access"]) for s in audit.summary()} == {("0x10", "read"), ("0x186", "write"),
                                                                   ("0x10", "write")}
