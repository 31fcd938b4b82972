"""VM introspection (the KVMI protocol and its permission model): kvmgate plays KVM's part.

ids          v12 message/event ids (IntEnums: also the meaning for the other ABI), actions,
             KVM_E* codes and their names
abi          the two wire dialects, `V12` (the patch series) and `V7` (libkvmi's kvmi-v7)
permissions  the owner's allow/disallow model (docs/introspection.md)
protocol     v12 framing, Reader, payload codecs
backend      `Backend`: what the server needs from a live VM
controlled   `ControlledMsrs`: VCPU_CONTROL_MSR's checks and bookkeeping, shared by the backends
server       `IntrospectionServer` (one tool connection, one dialect): its events and closing
connection   `Connection`: the server's socket, its reader thread and sends
tool_state   `ToolState`: what the tool set up (events, controlled MSRs, pauses, waiting vCPUs)
commands     `Commands`: answering one command message (route, permission, size, reply)
command_handlers  `CommandHandlers`: what each command does, one handler per `abi.Op`
owner        `Introspection`: hook/unhook/allow, attached as `machine.introspection`
client       `Client`: the tool's side (v12)
machine_backend  `MachineBackend` (the Backend on a live Machine), `attach(machine)`,
             `IntrospectionCrash` (a tool answered CRASH: raised out of `Machine.run()`)
listener     `IntrospectionListener`: a unix socket that hooks the tool that connects
connector    `IntrospectionConnector`: connect to a listening tool with QEMU's handshake
session      `serve(machine, spec, ...)`: listen or connect as a spec says (`kvmgate run`)
"""
from .abi import V7, V12, Dialect
from .backend import Backend
from .client import Client, Crash, Event, IntrospectionError
from .ids import CONTINUE, CRASH, RETRY, Action
from .connector import IntrospectionConnector
from .listener import IntrospectionListener
from .machine_backend import IntrospectionCrash, MachineBackend, attach
from .owner import Introspection
from .permissions import Permissions
from .protocol import ProtocolError
from .server import EventResult, IntrospectionServer
from .session import serve

__all__ = ["Action", "Backend", "CONTINUE", "CRASH", "Client", "Crash", "Dialect", "Event",
           "EventResult", "Introspection", "IntrospectionConnector", "IntrospectionCrash",
           "IntrospectionError", "IntrospectionListener", "IntrospectionServer",
           "MachineBackend", "Permissions", "ProtocolError", "RETRY", "V7", "V12", "attach",
           "serve"]

from ..vm import Machine as _Machine
from .machine_backend import new_introspection as _new

# The documented Machine extension point: `machine.introspection` / machine.extension(
# "introspection") is made by new_introspection() on first use and unhooked on close().
_Machine.register_extension("introspection", _new, lambda intro: intro.unhook())
