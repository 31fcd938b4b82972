"""`kvmgate demo` and `kvmgate info`."""
from __future__ import annotations

from ..demo import run_demo, run_policy_demo
from ..engine import available as engine_available, unavailable_reason
from ..hostinfo import host_info
from ..report import emit, table


def cmd_demo(a) -> int:
    rows = run_demo()
    policy, audit_rows, summary = run_policy_demo()
    if a.json:
        emit({"probes": rows, "policy": policy, "audit": audit_rows, "summary": summary}, True)
        return 0
    print("1) A guest probes real MSRs on /dev/kvm; LSTAR writes are filtered, every failure\n"
          "   exits to user space, which answers MSR_CORE_THREAD_COUNT and #GPs the rest.\n")
    table(rows)
    print(f"\n2) The bundled policy {policy}\n   on the bundled probe guest: the audit log "
          "(kernel-handled accesses make no record).\n")
    table(audit_rows)
    print("\n   Run-end counters (including unlogged decisions):\n")
    table(summary)
    return 0


def cmd_info(a) -> int:
    info = host_info(a.device)
    info["engine"] = {"available": engine_available(), "reason": unavailable_reason()}
    info["exit_path"] = ("C run loop (csrc/runloop.c) for policies bound through the C engine "
                         "(kvmgate run --policy, EnginePolicy); on_msr handlers called from the "
                         "C handler loop; introspection MSR events in C (csrc/kvmi_event.c)"
                         if engine_available() else
                         "Python exit loop (no C engine: " + unavailable_reason() + ")")
    if a.json:
        emit(info, True)
        return 0
    print(f"device:                      {info['device']}")
    print(f"KVM API version:             {info['api_version']}")
    for name, v in info["capabilities"].items():
        print(f"{name + ':':<29}{'yes' if v else 'NO'} ({v})")
    im = info["ignore_msrs"]
    print(f"kvm.ignore_msrs:             {'unknown' if im is None else ('Y' if im else 'N')}"
          + ("  (unknown MSRs are swallowed host-wide: no UNKNOWN exits)" if im else ""))
    print(f"MSRs KVM saves/restores:     {info['msrs_saved_by_kvm']}")
    eng = info["engine"]
    print(f"C policy engine:             {'yes' if eng['available'] else 'NO: ' + eng['reason']}")
    print(f"exit path:                   {info['exit_path']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run a bundled guest that probes MSRs and show where each access went")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("info", help="the host's KVM facts")
    p.add_argument("--device", default="/dev/kvm")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
