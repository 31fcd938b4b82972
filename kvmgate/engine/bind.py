"""Machine.set_policy() with the C engine answering the policy's exits.

    m.set_policy(EnginePolicy(cp), audit)            # instead of m.set_policy(cp, audit)

bind() has CompiledPolicy.bind's contract (a vm.PolicyBinding: filter, exit mask, on_msr handler,
what the machine shows as machine.policy, and the carry): the engine's emulated-register State is
the carry, so it passes to the next EnginePolicy bound on the same machine, as the Python path's
Registers do."""
from __future__ import annotations

from ..msr.model import EXIT_REASON_FILTER
from ..vm import PolicyBinding
from .binding import Engine, State
from .handler import make_engine_handler
from .table import mode_of


class EnginePolicy:
    """`c_loop`: let the machine answer this policy's exits in the C run loop (runloop.py);
    False keeps every exit on the Python exit loop (same answers, records and counts)."""

    def __init__(self, cp, mode: str | None = None, c_loop: bool = True):
        self.cp = cp
        self.mode = mode_of(cp, mode)
        self.c_loop = c_loop

    def bind(self, machine, audit=None, carry=None):
        state = carry if isinstance(carry, State) else State()
        engine = Engine(self.cp, self.mode, state)
        mask = self.cp.exit_mask
        if self.mode == "audit":
            # permissive: every access the filter denies must reach the engine to be logged
            # and carried out, also where enforce mode would let KVM inject the #GP itself
            mask |= EXIT_REASON_FILTER
        return PolicyBinding(self.cp.filter, mask, make_engine_handler(engine, audit, c_loop=self.c_loop),
                             self.cp, state)
