"""VM introspection (the KVMI protocol and its permission model): kvmgate plays KVM's part.

ids          message/event ids, actions, KVM_E* codes and their names
permissions  the owner's allow/disallow model (spec §1)
protocol     framing, Reader, payload codecs (spec §2, §3)
backend      `Backend`: what the server needs from a live VM
server       `IntrospectionServer` (one tool connection); re-exports `Introspection`
owner        `Introspection`: hook/unhook/allow, attached as `machine.introspection`
client       `Client`: the tool's side
machine_backend  `MachineBackend` (the Backend on a live Machine), `attach(machine)`,
             `IntrospectionCrash` (a tool answered CRASH: raised out of `Machine.run()`)
listener     `IntrospectionListener`: a unix socket that hooks the tool that connects
bench        `bench_events()`: event round trip vs a plain user-space MSR exit
"""
from .backend import Backend
from .client import Client, Crash, Event, IntrospectionError
from .ids import CONTINUE, CRASH, RETRY, Action
from .listener import IntrospectionListener
from .machine_backend import IntrospectionCrash, MachineBackend, attach
from .owner import Introspection
from .permissions import Permissions
from .protocol import ProtocolError
from .server import EventResult, IntrospectionServer

__all__ = ["Action", "Backend", "CONTINUE", "CRASH", "Client", "Crash", "Event", "EventResult",
           "Introspection", "IntrospectionCrash", "IntrospectionError", "IntrospectionListener",
           "IntrospectionServer", "MachineBackend", "Permissions", "ProtocolError", "RETRY",
           "attach"]

from ..vm import Machine as _Machine
from .machine_backend import new_introspection as _new

# The documented Machine extension point: `machine.introspection` / machine.extension(
# "introspection") is made by new_introspection() on first use and unhooked on close().
_Machine.register_extension("introspection", _new, lambda intro: intro.unhook())
