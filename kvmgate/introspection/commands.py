"""Answering one KVMI command message (docs/introspection.md §2): route it by the dialect, check
permission and size, split off the vCPU header, run its handler (command_handlers.py) and send
the reply, or raise ProtocolError when the connection must close.

kvmi-v7 CONTROL_CMD_RESPONSE is answered here: it turns the replies of later commands off and on
(see server.py).
"""
from __future__ import annotations

import logging
from typing import Callable

from . import ids
from .abi import V7_CMD_RESPONSE_REQ, Dialect, Op
from .command_handlers import EINVAL, EPERM, Handler
from .permissions import Permissions
from .protocol import VCPU_HDR, Message, ProtocolError, pack_reply

__all__ = ["Commands", "KVM_CODES"]

log = logging.getLogger("kvmgate.introspection")

KVM_CODES = frozenset(ids.ERROR_NAMES)


def _error_code(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    return -err if isinstance(err, int) and err in KVM_CODES else -ids.KVM_EFAULT


class Commands:
    """Answers the commands of one connection with `handlers` (Op -> handler), replying with
    `send`; `vcpu_count` bounds the vCPU header."""

    def __init__(self, abi: Dialect, permissions: Permissions, handlers: dict[Op, Handler],
                 vcpu_count: Callable[[], int], send: Callable[[bytes], bool]):
        self.abi = abi
        self._perms = permissions
        self._ops = handlers
        self._vcpu_count = vcpu_count
        self._send = send
        self._replies_off = False       # kvmi-v7 CONTROL_CMD_RESPONSE
        self.handler_errors: list[tuple[str, BaseException]] = []   # last few, for diagnosis

    def command(self, msg: Message) -> None:
        """Answer one command; ProtocolError when the connection must close."""
        mid, payload = msg.id, msg.payload
        route = self.abi.route(mid)
        if route is None:
            raise ProtocolError(f"unknown message id {mid} ({self.abi.name})")
        # These two are answered even while replies are off (the kernel's rule).
        if route.op is Op.UNSERVED:
            return self._reply(msg, self.abi.unserved_error, force=True)
        if route.perm is not None and not self._perms.command_allowed(route.perm):
            return self._reply(msg, EPERM, force=True)
        head = VCPU_HDR.size if route.vcpu else 0
        if len(payload) < head + route.size:
            raise ProtocolError(f"{route.name}: {len(payload)} bytes, needs {head + route.size}")
        if route.op is Op.CONTROL_CMD_RESPONSE:
            return self._cmd_response(msg)
        vcpu = None
        try:
            if route.vcpu:
                vcpu, p1, p2 = VCPU_HDR.unpack_from(payload)
                if p1 or p2 or vcpu >= self._vcpu_count():
                    return self._reply(msg, EINVAL)
            err, data = self._ops[route.op](vcpu, payload[head:])
            if err > 0:
                err = -err
        except ProtocolError:
            raise
        except Exception as exc:
            err, data = _error_code(exc), b""
            self.handler_errors[:] = self.handler_errors[-15:] + [(route.name, exc)]
            log.warning("%s failed: %r", route.name, exc)
        self._reply(msg, err, data, force=route.op is Op.PAUSE_VCPU and err == EPERM)

    def _reply(self, msg: Message, err: int, data: bytes = b"", force: bool = False) -> None:
        if self._replies_off and not force:
            if err:
                log.info("%s: error %s dropped (replies are off)",
                         self.abi.command_name(msg.id), ids.error_name(err))
            return
        self._send(pack_reply(msg.id, msg.seq, err, data))

    def _cmd_response(self, msg: Message) -> None:
        """kvmi-v7 CONTROL_CMD_RESPONSE {u8 enable; u8 now; u16; u32}."""
        enable, now, p1, p2 = V7_CMD_RESPONSE_REQ.unpack_from(msg.payload)
        if p1 or p2:
            return self._reply(msg, EINVAL)
        off = not enable
        if now == 1:
            self._replies_off = off
        self._reply(msg, 0)
        if now != 1:
            self._replies_off = off
