"""The owner's allow/disallow model for introspection commands and events
(docs/introspection.md, the permission ioctls of the KVMI series).

Pure: no socket, no VM.  "Hooked" (EFAULT) and "introspection disabled" (EPERM) are states of the
owner object (`owner.Introspection`), not of this class.

Known ids are every v12 command and event of the spec tables, including the ones listed "for
reference" that our server does not implement: the seed's kernel accepts them, so the owner may
allow them; the server then answers them -KVM_ENOSYS (see server.py).  Ids in the gaps of those
tables (e.g. command 22, event 2) and the event message ids 0/1 (not commands) are unknown.
"""
from __future__ import annotations

import errno

from ..errors import KvmError
from . import ids

IOCTL_COMMAND = "KVM_INTROSPECTION_COMMAND"
IOCTL_EVENT = "KVM_INTROSPECTION_EVENT"
ALL = -1


def check_feature(allow: object, fid: object, known: frozenset, ioctl: str,
                  obj: object = None) -> bool:
    """Validate struct kvm_introspection_feature {u32 allow; s32 id}; return allow as a bool.

    EINVAL: allow not 0/1, id < -1, or id neither -1 nor a known id.
    """
    what = "command" if ioctl == IOCTL_COMMAND else "event"
    if not isinstance(allow, int) or allow < 0 or allow > 1:
        raise KvmError(errno.EINVAL, ioctl, obj, f"allow must be 0 or 1, not {allow!r}")
    if not isinstance(fid, int) or fid < ALL:
        raise KvmError(errno.EINVAL, ioctl, obj, f"bad {what} id {fid!r}")
    if fid != ALL and fid not in known:
        raise KvmError(errno.EINVAL, ioctl, obj, f"unknown {what} id {fid}")
    return allow == 1


class Permissions:
    """Which commands and events the tool may use.  Defaults: only the always-allowed commands."""

    __slots__ = ("obj", "_commands", "_events")

    def __init__(self, obj: object = None):
        self.obj = obj
        self._commands = set(ids.ALWAYS_ALLOWED)
        self._events: set[int] = set()

    def allow_command(self, cid: int, allow: int) -> None:
        """KVM_INTROSPECTION_COMMAND; id -1 = all (allow=0 keeps the always-allowed three)."""
        on = check_feature(allow, cid, ids.COMMANDS, IOCTL_COMMAND, self.obj)
        if cid == ALL:
            self._commands = set(ids.COMMANDS) if on else set(ids.ALWAYS_ALLOWED)
        elif on:
            self._commands.add(cid)
        elif cid in ids.ALWAYS_ALLOWED:
            raise KvmError(errno.EPERM, IOCTL_COMMAND, self.obj,
                           f"{ids.command_name(cid)} cannot be disallowed")
        else:
            self._commands.discard(cid)

    def allow_event(self, eid: int, allow: int) -> None:
        """KVM_INTROSPECTION_EVENT; id -1 = all."""
        on = check_feature(allow, eid, ids.EVENTS, IOCTL_EVENT, self.obj)
        if eid == ALL:
            self._events = set(ids.EVENTS) if on else set()
        elif on:
            self._events.add(eid)
        else:
            self._events.discard(eid)

    # Read on every command/event: plain set lookups (replacing a set is atomic for readers).
    def command_allowed(self, cid: int) -> bool:
        return cid in self._commands

    def event_allowed(self, eid: int) -> bool:
        return eid in self._events

    def allowed_commands(self) -> frozenset:
        return frozenset(self._commands)

    def allowed_events(self) -> frozenset:
        return frozenset(self._events)

    def __repr__(self) -> str:
        cmds = ",".join(ids.command_name(c) for c in sorted(self._commands))
        evs = ",".join(ids.event_name(e) for e in sorted(self._events))
        return f"Permissions(commands=[{cmds}], events=[{evs}])"
