"""The C policy engine (csrc/engine.c) for Python: the compiled table, decisions, verdicts for
explain/replay, and the audit-ring consumer.

    Engine(cp)              a CompiledPolicy's table loaded into the C engine; .decide(...)
    verdict(cp, i, w, r)    what the policy does with one exit (explain, trace replay)
    available()             whether the C extension was built (`pip install .` with a C compiler)
    Ring                    a per-vCPU audit ring in shared memory; records -> AuditLog
    CRunLoop                the C vCPU run loop for Machine (registered on import when built)
    AuditSink, sink_for     the C audit drain: ring records -> an AuditLog's lines, in C
"""
from .binding import (Decision, Engine, EngineUnavailable, State, available, result_text,
                      unavailable_reason)
from .bind import EnginePolicy
from .handler import make_engine_handler
from .ring import Ring, RingRecord, decode, deliver
from .auditsink import AuditSink, sink_for
from .runloop import CRunLoop      # registers the C run loop with vm.register_run_loop
from .table import EngineTable, EngineTableError, build_table, read_table
from .verdict import Verdict, replay_verdict, verdict

__all__ = ["EnginePolicy", "Decision", "Engine", "EngineUnavailable", "State", "available", "result_text",
           "unavailable_reason", "make_engine_handler", "AuditSink", "sink_for", "CRunLoop", "Ring", "RingRecord", "decode", "deliver", "EngineTable",
           "EngineTableError", "build_table", "read_table", "Verdict", "replay_verdict", "verdict"]
