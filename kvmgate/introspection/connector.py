"""Connect mode: kvmgate plays QEMU's part and connects to a listening introspection tool.

This is how libkvmi tools are deployed (`kvmi_init_unix_socket` / `kvmi_init_vsock` listen;
QEMU's introspection object connects).  On the new connection QEMU sends its handshake,
`struct kvmi_qemu2introspector` (96 bytes: u32 struct_size; u8 uuid[16]; u32 padding;
s64 start_time; char name[64]), reads the tool's `struct kvmi_introspector2qemu` (24 bytes:
u32 struct_size; u8 cookie_hash[20]; a newer tool may send more, which is read and ignored),
checks it (struct_size >= 24; with a key, cookie_hash == SHA-1 of the key, as QEMU's secret
object), then hands the socket to KVM (KVM_INTROSPECTION_HOOK).  kvmgate does the same and
hooks the socket into the machine's `Introspection` with the session's ABI (kvmi-v7 by default:
the one libkvmi speaks) and the owner's allow lists.  docs/introspection.md has the layouts.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import struct
import time
import uuid as _uuid
from typing import Iterable

from ..errors import UserError
from .abi import V7, Dialect
from .machine_backend import attach

__all__ = ["HANDSHAKE_OUT", "HANDSHAKE_IN", "HandshakeError", "IntrospectionConnector",
           "handshake", "pack_handshake", "read_answer"]

log = logging.getLogger("kvmgate.introspection")

# struct kvmi_qemu2introspector: u32 struct_size; u8 uuid[16]; u32 padding; s64 start_time;
# char name[64]
HANDSHAKE_OUT = struct.Struct("=I16sIq64s")
# struct kvmi_introspector2qemu: u32 struct_size; u8 cookie_hash[20]
HANDSHAKE_IN = struct.Struct("=I20s")
MAX_ANSWER = 64 * 1024             # libkvmi's own bound on handshake data
HANDSHAKE_TIMEOUT = 10.0           # QEMU's HANDSHAKE_TIMEOUT_SEC
assert HANDSHAKE_OUT.size == 96 and HANDSHAKE_IN.size == 24


class HandshakeError(Exception):
    """The tool's handshake answer is missing, malformed or has the wrong cookie."""


def pack_handshake(uuid: bytes, name: str, start_time: int) -> bytes:
    """kvmi_qemu2introspector; `name` is cut to 63 bytes (NUL-terminated)."""
    raw = name.encode("utf-8", "replace")[:63]
    return HANDSHAKE_OUT.pack(HANDSHAKE_OUT.size, bytes(uuid), 0, start_time, raw)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 65536))
        if not chunk:
            raise HandshakeError(f"the tool closed the connection after {len(buf)} of "
                                 f"{n} handshake bytes")
        buf += chunk
    return bytes(buf)


def read_answer(sock: socket.socket, key: bytes | None = None) -> bytes:
    """Read and check kvmi_introspector2qemu; return its cookie_hash."""
    size = struct.unpack("=I", _recv_exact(sock, 4))[0]
    if size < HANDSHAKE_IN.size:
        raise HandshakeError(f"handshake answer of {size} bytes (at least "
                             f"{HANDSHAKE_IN.size})")
    if size > MAX_ANSWER:
        raise HandshakeError(f"handshake answer of {size} bytes (at most {MAX_ANSWER})")
    rest = _recv_exact(sock, size - 4)
    cookie = rest[:20]
    if key is not None and cookie != hashlib.sha1(key).digest():
        raise HandshakeError("the tool's cookie does not match the key")
    return cookie


def handshake(sock: socket.socket, uuid: bytes, name: str, start_time: int,
              key: bytes | None = None, timeout: float = HANDSHAKE_TIMEOUT) -> bytes:
    """QEMU's side of the handshake on a connected socket; the tool's cookie_hash."""
    sock.settimeout(timeout)
    try:
        sock.sendall(pack_handshake(uuid, name, start_time))
        return read_answer(sock, key)
    except socket.timeout:
        raise HandshakeError(f"no handshake answer within {timeout}s") from None
    except OSError as exc:
        raise HandshakeError(f"handshake failed: {exc.strerror or exc}") from None


def connect_socket(family: str, address) -> socket.socket:
    where = address if family == "unix" else f"vsock CID {address[0]} port {address[1]}"
    s = None
    try:
        if family == "vsock":
            if not hasattr(socket, "AF_VSOCK"):
                raise OSError("vsock is not available in this Python")
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(HANDSHAKE_TIMEOUT)
        s.connect(address)
    except OSError as exc:
        if s is not None:
            s.close()
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise UserError(f"cannot connect to the introspection tool at {where}: {why}",
                        "--introspect") from None
    return s


class IntrospectionConnector:
    """Connects to a listening tool, does QEMU's handshake and hooks the tool.

    `family` "unix" with `address` a path, or "vsock" with (cid, port).  `start()` raises
    UserError when the tool cannot be reached or its answer is refused; `close()` unhooks
    (the tool gets UNHOOK if it enabled it and up to `unhook_wait` seconds to leave).
    """

    def __init__(self, machine, family: str, address, commands: Iterable[int] = (),
                 events: Iterable[int] = (), *, abi: Dialect = V7, name: str = "kvmgate",
                 uuid: bytes | None = None, key: bytes | None = None,
                 event_timeout: float | None = None, unhook_wait: float = 1.0):
        self.family, self.address = family, address
        self.commands, self.events = tuple(commands), tuple(events)
        self.abi, self.name, self.key = abi, name, key
        self.uuid = uuid if uuid is not None else _uuid.uuid4().bytes
        self.start_time = int(time.time())
        self.unhook_wait = unhook_wait
        self.intro = attach(machine)
        if event_timeout is not None:
            self.intro.event_timeout = event_timeout
        self.cookie: bytes | None = None

    def start(self) -> "IntrospectionConnector":
        s = connect_socket(self.family, self.address)
        try:
            self.cookie = handshake(s, self.uuid, self.name, self.start_time, self.key)
            self.intro.hook(s, self.uuid, commands=self.commands, events=self.events,
                            abi=self.abi)
        except HandshakeError as exc:
            raise UserError(f"introspection handshake refused: {exc}", "--introspect") from None
        finally:
            s.close()        # hook() keeps its own duplicate
        log.info("introspection: hooked the tool at %s (%s ABI)", self.address, self.abi.name)
        return self

    @property
    def connected(self) -> bool:
        return self.intro.connected

    def close(self) -> None:
        """Unhook the tool.  Idempotent."""
        try:
            self.intro.unhook(wait=self.unhook_wait)
        except Exception:
            log.exception("introspection: unhook failed")

    def __enter__(self) -> "IntrospectionConnector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
