"""Introspection of a wrapped VMM, from the parent's side: `--introspect connect:...` options
(IntrospectOptions), connecting to the tool with QEMU's handshake before the VMM starts, and
hooking the session at the VMM's first KVM_RUN (ToolHookup, a mixin of session.Wrap).  The
vCPU side is kvmgate.wrap.introspect (docs/introspection.md, "4. The dialect deployed tools
speak: libkvmi and `kvmi-v7`")."""
from __future__ import annotations

import time
import uuid as _uuid
from dataclasses import dataclass

from ..errors import UserError
from ..introspection.connector import HandshakeError, connect_socket, handshake
from ..introspection.listener import parse_ids
from ..introspection.owner import Introspection
from ..introspection.session import dialect_for, parse_spec
from .introspect import WrapBackend


@dataclass
class IntrospectOptions:
    """`--introspect connect:...` of `kvmgate wrap` (kvmgate.introspection.session's spec)."""
    where: str
    family: str
    address: object
    abi: object
    commands: tuple
    events: tuple
    name: str = "kvmgate-wrap"
    key: bytes | None = None
    uuid: bytes = b""
    event_timeout: float | None = None
    unhook_wait: float = 1.0

    @classmethod
    def parse(cls, spec: str, abi: str | None, commands, events, key: bytes | None = None,
              name: str = "kvmgate-wrap") -> IntrospectOptions:
        """UserError for anything but connect mode or bad ids (exit 2)."""
        t = parse_spec(spec)
        if not t.connect:
            raise UserError(f"{spec!r}: kvmgate wrap connects to the tool as QEMU does: "
                            "connect:unix:PATH or connect:vsock:CID:PORT", "--introspect")
        return cls(spec, t.family, t.address, dialect_for(abi, t),
                   tuple(parse_ids(commands, "command")), tuple(parse_ids(events, "event")),
                   name, key, _uuid.uuid4().bytes)

    def connect(self):
        """A connected socket with QEMU's handshake done (UserError if not)."""
        s = connect_socket(self.family, self.address)
        try:
            handshake(s, self.uuid, self.name, int(time.time()), self.key)
        except HandshakeError as exc:
            s.close()
            raise UserError(f"introspection handshake refused: {exc}", "--introspect") from None
        return s


class ToolHookup:
    """session.Wrap's introspection tool: `introspect` (IntrospectOptions or None), `kvmi` (the
    WrapBackend), `intro` (its Introspection, once hooked), `_tool` (the connected socket)."""

    def _connect_tool(self) -> None:
        """Before the VMM starts: connect to the tool and do QEMU's handshake (UserError if
        it cannot be reached or refuses); the session is hooked at the first KVM_RUN, when
        QEMU has created every vCPU."""
        self._tool = self.introspect.connect()
        self.kvmi = WrapBackend(self)

    def _hook_tool(self) -> None:
        o = self.introspect
        self.intro = Introspection(self.kvmi, obj=self, event_timeout=o.event_timeout)
        self.kvmi.intro = self.intro
        try:
            self.intro.hook(self._tool, o.uuid, commands=o.commands, events=o.events, abi=o.abi)
            print(f"kvmgate: introspection tool at {o.where} hooked ({o.abi.name} ABI, "
                  f"{self.kvmi.vcpu_count()} vCPUs)", file=self.err, flush=True)
        except OSError as e:
            print(f"kvmgate: introspection: cannot hook the tool: {e}", file=self.err, flush=True)
            self.failures.append(f"introspection: {e}")
        finally:
            self._tool.close()

    def _unhook_tool(self) -> None:
        if self.intro is not None:
            self.intro.unhook(wait=self.introspect.unhook_wait)
        elif self._tool is not None:
            self._tool.close()
        if self.kvmi is not None:
            self.kvmi.close()


__all__ = ["IntrospectOptions", "ToolHookup"]
