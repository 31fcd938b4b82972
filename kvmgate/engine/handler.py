"""An on_msr handler answered by the C engine: the engine-backed counterpart of
kvmgate.policy.handlers.make_handler (same replies, same audit calls), for a Machine whose
exits still come through Python, and for the differential tests that hold the two equal.

Audit records are made by the engine (kg_record_fill) and either pushed into a per-vCPU Ring
(a consumer delivers them) or decoded and handed to the AuditLog at once.  The hot path uses
the extension's raw tuples (result, value, action, rule id, flags): no objects per exit."""
from __future__ import annotations

from ..errors import InjectGP
from .binding import DF_COUNT, DF_LOG, RES_GP, RES_HOST, RES_VALUE, Engine, native
from .ring import decode, deliver


def make_engine_handler(engine: Engine, audit=None, rings=None):
    """on_msr handler deciding with `engine`; `rings[vcpu]` (optional) receives the records."""
    decide = engine.decide_raw
    rules = engine.table.rules
    ext = native()
    host_done, record_fill = ext.host_done, ext.record_fill
    report = audit is not None or rings is not None

    def handler(exit):
        index, write, data, reason, vcpu = exit.index, exit.is_write, exit.data, exit.reason, exit.vcpu
        d = decide(index, write, reason, data)
        if d[0] == RES_HOST:
            done = exit.host_access()
            d = host_done(d, write, done is not None, done or 0)
        flags = d[4]
        if report and flags & DF_COUNT:
            rip = None
            if flags & DF_LOG:
                try:
                    rip = exit.regs().rip
                except Exception:
                    rip = None
            rec = record_fill(d, vcpu, rip or 0, rip is not None, index, write, reason, data)
            if rings is not None:
                rings[vcpu].push(rec)
            else:
                deliver(decode(rec, rules), audit)
        result = d[0]
        if result == RES_GP:
            return InjectGP
        return d[1] if result == RES_VALUE else None

    handler.engine = engine
    return handler
