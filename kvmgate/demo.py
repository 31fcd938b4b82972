"""`kvmgate demo`: a guest probes a handful of real MSRs; a table says where each access went."""
from __future__ import annotations

from dataclasses import dataclass

from . import guest
from .asm import assemble
from .errors import InjectGP
from .vm import Machine
from .msr.model import EXIT_REASON_VALID_MASK, WRITE, MsrFilter, MsrRange, reason_name


@dataclass
class Probe:
    index: int
    name: str
    write: bool = False
    value: int = 0


PROBES = [
    Probe(0x10, "IA32_TSC"),
    Probe(0xC0000080, "IA32_EFER"),
    Probe(0x1B, "IA32_APIC_BASE"),
    Probe(0x35, "MSR_CORE_THREAD_COUNT"),
    Probe(0x12345678, "(not an MSR)"),
    Probe(0xC0000082, "IA32_LSTAR", write=True, value=0xFFFFFFFF81000000),
    Probe(0xC0000082, "IA32_LSTAR"),
    Probe(0xC0000080, "IA32_EFER", write=True, value=0x500 | (1 << 20)),
]


def probe_program(probes: list[Probe]) -> tuple[bytes, list[int]]:
    """Machine code running the probes, and the RIP of each probe's RDMSR/WRMSR.

    Each probe's RDMSR result (or 0) is stored at DATA + 8*i."""
    code, rips = b"", []
    for i, p in enumerate(probes):
        setup = [f"mov ecx, {p.index:#x}"]
        if p.write:
            setup += [f"mov eax, {p.value & 0xFFFFFFFF:#x}", f"mov edx, {p.value >> 32:#x}"]
        head = assemble("\n".join(setup), guest.CODE + len(code))
        rips.append(guest.CODE + len(code) + len(head))
        tail = ["wrmsr", "xor eax, eax", "xor edx, edx"] if p.write else ["rdmsr"]
        tail += ["shl rdx, 32", "or rax, rdx", f"mov [{guest.DATA + 8 * i:#x}], rax"]
        code += head + assemble("\n".join(tail), guest.CODE + len(code) + len(head))
    return code + assemble("hlt", guest.CODE + len(code)), rips


def run_demo() -> list[dict]:
    """Run the probes with every failure reason sent to user space; LSTAR writes filtered."""
    lstar = {}
    program, rips = probe_program(PROBES)
    with Machine(program) as m:
        m.enable_user_space_msr(EXIT_REASON_VALID_MASK)
        m.set_msr_filter(MsrFilter([MsrRange.all(WRITE, 0xC0000082, 1, allow=False)]))

        @m.on_msr
        def handler(exit):
            if exit.index == 0x35 and not exit.is_write:
                return (1 << 16) | 1            # 1 core, 1 thread, as QEMU answers it for a 1-vCPU guest
            if exit.index == 0xC0000082 and exit.is_write:
                lstar["value"] = exit.data      # logged and dropped
                return None
            raise InjectGP

        r = m.run(timeout=10)
        values = [int.from_bytes(m.read_mem(guest.DATA + 8 * i, 8), "little") for i in range(len(PROBES))]
    exits = iter(r.msr_exits)      # in guest order, one per probe that exited
    faulted = {f.rip for f in r.gp_faults}
    rows = []
    pending = next(exits, None)
    for i, p in enumerate(PROBES):
        gp = rips[i] in faulted
        if pending is not None and pending.index == p.index and pending.is_write == p.write:
            where = f"user space ({reason_name(pending.reason)})"
            pending = next(exits, None)
        else:
            where = "kernel"
        result = "#GP" if gp else ("written" if p.write and where == "kernel"
                                   else "write dropped" if p.write else f"{values[i]:#x}")
        rows.append({"access": "WRMSR" if p.write else "RDMSR", "msr": f"{p.index:#x}",
                     "name": p.name, "value": f"{p.value:#x}" if p.write else "",
                     "handled_by": where, "result": result})
    return rows


def run_policy_demo() -> tuple[str, list[dict], list[dict]]:
    """The bundled deny-by-default policy on the bundled probe guest: audit records and counts."""
    import io
    import json
    from pathlib import Path

    from .audit import AuditLog
    from .policy import load_policy
    here = Path(__file__).resolve().parent / "examples"
    buf = io.StringIO()
    audit = AuditLog(buf)
    with Machine((here / "probe.S").read_text()) as m:
        m.set_policy(load_policy(here / "deny-by-default.toml"), audit)
        m.run(timeout=10)
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    rows = [{"rip": r["rip"], "access": r["access"], "msr": r["msr"], "name": r["name"],
             "value": r["value"] if r["access"] == "write" else "", "action": r["action"],
             "result": r["result"]} for r in records]
    return str(here / "deny-by-default.toml"), rows, audit.summary()
