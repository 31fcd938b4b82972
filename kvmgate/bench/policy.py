"""`kvmgate bench policy`: what policies cost.  Compilation (a large policy of single MSRs, one
rule over every MSR, 10,000 such rules: compilation works on intervals, so the last two cost
about as much as one rule), and per-exit cost of the policy handler against a bare on_msr
handler on the same guest, in interleaved rounds."""
from __future__ import annotations

import warnings

from ..machine import Machine
from ..policy import compile_policy, parse_policy
from .common import count_arg, emit, load_average, load_row, median_of, paired, parser, timed
from .exits import exit_guest, time_python


def large_policy_text(n_rules: int) -> str:
    """A deny-by-default policy with `n_rules` rules over 16 clusters of MSRs."""
    out = ["[policy]", "default = \"deny\"", ""]
    bases = [0x0, 0x1000, 0x4000, 0x8000, 0xC000, 0x10000, 0x20000, 0x30000, 0x40000000,
             0x4B564D00, 0xC0000000, 0xC0010000, 0xC0020000, 0xC0030000, 0xD0000000, 0xE0000000]
    for i in range(n_rules):
        msr = bases[i % 16] + (i // 16) * 3
        action = ("allow", "constant", "ignore", "emulate", "deny")[i % 5]
        out += ["[[rule]]", f"msr = {msr:#x}", f"action = \"{action}\""]
        if action == "constant":
            out.append("value = 7")
        out.append("")
    return "\n".join(out)


def wide_policy_text(n_rules: int) -> str:
    """`n_rules` rules each over every MSR (0..0xffffffff), as the issue that found the
    per-MSR compiler's cost wrote them."""
    return "[policy]\nx2apic = \"warn\"\n\n" + \
        "[[rule]]\nrange = [0, 0xffffffff]\naction = \"ignore\"\n\n" * n_rules


def compile_seconds(text: str, rounds: int) -> float:
    """Median wall seconds of parse + compile."""
    def once():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile_policy(parse_policy(text, "<bench>"))
    return median_of(rounds, lambda: timed(once))


CONSTANT_35 = ("[policy]\ndefault='allow'\n[[rule]]\nmsr=0x35\naccess='read'\naction='constant'\n"
               "value=0x10001\nlog=false\n")


def bench_policy(n_rules: int = 4000, n_exits: int = 20000, rounds: int = 9, wide: int = 10000) -> dict:
    """Compile times (medians of `rounds`), and the policy handler vs a bare handler per exit."""
    before = load_average()
    large = large_policy_text(n_rules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp = compile_policy(parse_policy(large, "<bench>"))
    res = {"rules": n_rules, "ranges": len(cp.filter.ranges),
           "compile_s": compile_seconds(large, rounds),
           "compile_one_wide_rule_s": compile_seconds(wide_policy_text(1), rounds),
           "wide_rules": wide,
           "compile_wide_rules_s": compile_seconds(wide_policy_text(wide), max(3, rounds // 3))}
    policy = parse_policy(CONSTANT_35, "<bench>")
    bare_filter = compile_policy(policy).filter
    with Machine(exit_guest(n_exits, msr=0x35)) as m:
        def bare():
            m.set_msr_filter(bare_filter)
            m.enable_user_space_msr(7)
            m.on_msr(lambda exit: 0x10001)
            return time_python(m)

        def with_policy():
            m.set_policy(policy)
            return time_python(m)

        bare()
        with_policy()                    # warm up both
        pair = paired(rounds, with_policy, bare)
    res.update(bare_handler_us=pair["baseline"] * 1e6, policy_handler_us=pair["measured"] * 1e6,
               ratio=pair["ratio"], ratio_spread=pair["ratio_spread"], exit_rounds=rounds,
               load_average=[before, load_average()])
    return res


def main(argv: list[str]) -> int:
    ap = parser("policy", __doc__)
    ap.add_argument("--rules", type=count_arg, default=4000, help="rules in the large policy")
    ap.add_argument("--wide-rules", type=count_arg, default=10000, help="rules over every MSR")
    ap.add_argument("-n", type=count_arg, default=20000, help="MSR exits per round")
    a = ap.parse_args(argv)
    res = bench_policy(a.rules, a.n, a.rounds, a.wide_rules)
    lo, hi = res["ratio_spread"]
    emit(res, a.json, [
        ("large policy", f"{res['rules']} single-MSR rules -> {res['ranges']} filter ranges"),
        ("  parse + compile", f"{res['compile_s'] * 1e3:.1f} ms (median)"),
        ("one rule over 0..0xffffffff", f"{res['compile_one_wide_rule_s'] * 1e3:.1f} ms (median)"),
        (f"{res['wide_rules']} such rules", f"{res['compile_wide_rules_s'] * 1e3:.0f} ms (median)"),
        ("bare on_msr handler", f"{res['bare_handler_us']:.2f} us/exit (median)"),
        ("policy handler (constant)", f"{res['policy_handler_us']:.2f} us/exit (median)"),
        ("ratio policy / bare", f"{res['ratio']:.3f}x median of {res['exit_rounds']} paired rounds, "
                                f"spread {lo:.2f}x .. {hi:.2f}x"),
        load_row(res)])
    return 0
