"""An on_msr handler answered by the C engine: the engine-backed counterpart of
kvmgate.policy.handlers.make_handler (same replies, same audit calls), for a Machine whose
exits still come through Python, and for the differential tests that hold the two equal.

Audit records are made by the engine (kg_record_fill) and either pushed into a per-vCPU Ring
(a consumer delivers them) or decoded and handed to the AuditLog at once."""
from __future__ import annotations

from ..errors import InjectGP
from .binding import RES_GP, RES_VALUE, Engine
from .ring import decode, deliver


def make_engine_handler(engine: Engine, machine, audit=None, rings=None):
    """on_msr handler deciding with `engine`; `rings[vcpu]` (optional) receives the records."""
    decide = engine.decide
    rules = engine.table.rules

    def handler(exit):
        index, write, data, reason, vcpu = exit.index, exit.is_write, exit.data, exit.reason, exit.vcpu
        d = decide(index, write, reason, data)
        if d.host:
            done = machine.vcpus[vcpu].host_msr_access(index, write, data)
            d = d.host_done(write, done is not None, done or 0)
        if d.counted and (audit is not None or rings is not None):
            rip = None
            if d.log:
                try:
                    rip = machine.vcpus[vcpu].get_regs().rip
                except Exception:
                    rip = None
            rec = engine.record(d, vcpu=vcpu, rip=rip, index=index, is_write=write,
                                reason=reason, data=data)
            if rings is not None:
                rings[vcpu].push(rec)
            else:
                deliver(decode(rec, rules), audit)
        if d.result == RES_GP:
            return InjectGP
        return d.value if d.result == RES_VALUE else None

    handler.engine = engine
    return handler
