"""`serve()`: give a Machine's introspection to a tool, the library call behind
`kvmgate run GUEST --introspect SPEC`.

SPEC is one of
* ``unix:PATH``: listen on PATH (mode 0600, same uid only) and hook the first tool that
  connects (IntrospectionListener); default ABI v12;
* ``connect:unix:PATH`` / ``connect:vsock:CID:PORT``: connect to a listening tool as QEMU does,
  with its handshake (IntrospectionConnector); default ABI kvmi-v7, the one libkvmi speaks.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

from ..errors import UserError
from .abi import DIALECTS, V7, V12, Dialect
from .connector import IntrospectionConnector
from .listener import IntrospectionListener, parse_ids, parse_target

__all__ = ["Target", "parse_spec", "serve"]

WHERE = "--introspect"


class Target(NamedTuple):
    connect: bool          # True: we connect to the tool; False: we listen
    family: str            # "unix" or "vsock"
    address: object        # a path, or (cid, port)


def parse_spec(spec: str) -> Target:
    """'unix:PATH', 'connect:unix:PATH' or 'connect:vsock:CID:PORT' (UserError otherwise)."""
    if not isinstance(spec, str):
        raise UserError(f"{spec!r}: expected unix:PATH or connect:unix:PATH", WHERE)
    if not spec.startswith("connect:"):
        return Target(False, "unix", parse_target(spec))
    rest = spec[len("connect:"):]
    if rest.startswith("unix:"):
        return Target(True, "unix", parse_target(rest))
    if rest.startswith("vsock:"):
        parts = rest[len("vsock:"):].split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            cid, port = int(parts[0], 0), int(parts[1], 0)
            if not (0 <= cid < 2**32 and 0 <= port < 2**32):
                raise ValueError
        except ValueError:
            raise UserError(f"{spec!r}: expected connect:vsock:CID:PORT (32-bit numbers)",
                            WHERE) from None
        return Target(True, "vsock", (cid, port))
    raise UserError(f"{spec!r}: expected connect:unix:PATH or connect:vsock:CID:PORT", WHERE)


def dialect_for(name: str | None, target: Target) -> Dialect:
    """The ABI called `name` ('v7', 'v12'), or the target's default (connect: v7, listen: v12)."""
    if name is None:
        return V7 if target.connect else V12
    try:
        return DIALECTS[name]
    except KeyError:
        raise UserError(f"unknown KVMI ABI {name!r}: expected one of "
                        f"{', '.join(sorted(DIALECTS))}", "--kvmi-abi") from None


def serve(machine, spec: str, allow_commands: Iterable[str] | None = None,
          allow_events: Iterable[str] | None = None, *, abi: str | None = None,
          name: str = "kvmgate", key: bytes | None = None):
    """Serve `machine`'s introspection as `spec` says, with `allow_commands`/`allow_events`
    (names in either ABI, numeric v12 ids or 'all'; comma lists too) allowed.

    Returns the started IntrospectionListener or IntrospectionConnector: close() it when the
    run ends.  `name` and `key` are for connect mode (the VM name in the handshake; the secret
    whose SHA-1 the tool must answer with).  UserError for bad arguments or an unreachable tool.
    """
    target = parse_spec(spec)
    dialect = dialect_for(abi, target)
    commands = parse_ids(allow_commands, "command")
    events = parse_ids(allow_events, "event")
    if target.connect:
        return IntrospectionConnector(machine, target.family, target.address, commands, events,
                                      abi=dialect, name=name, key=key).start()
    if key is not None:
        raise UserError("a key is for connect mode (the tool's handshake)", WHERE)
    return IntrospectionListener(machine, target.address, commands, events, abi=dialect).start()
