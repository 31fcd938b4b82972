"""Serve a Machine's introspection on a unix socket: the owner side of `kvmgate run --introspect`.

`IntrospectionListener(machine, path, commands, events).start()` listens on `path` (created
mode 0600 and unlinked on close), and hooks the first tool that connects, with the given
commands and events allowed before its first message is read.  A peer whose uid differs from
ours (SO_PEERCRED) is refused, as is a second tool while one is connected; once the tool has
gone (EOF, protocol error), the next one may connect and is hooked afresh (defaults again, then
the allow lists).  `close()` unhooks (the tool gets VM_EVENT_UNHOOK if it enabled it and up to
`unhook_wait` seconds to leave), closes and unlinks the socket.  `abi` is the session's wire
dialect (abi.V12 by default; abi.V7 for libkvmi tools that connect instead of listening).
The listen backlog (LISTEN_BACKLOG) queues a burst of connects; they are then taken one by one.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import struct
import threading
import uuid as _uuid
from typing import Iterable, NamedTuple

from ..errors import UserError
from . import ids
from .abi import V7, V12, Dialect
from .machine_backend import attach

__all__ = ["IntrospectionListener", "parse_target", "parse_ids", "peer_credentials", "Peer"]

log = logging.getLogger("kvmgate.introspection")
LISTEN_BACKLOG = 128     # a burst of connects queues (then all but one are refused, one by one)
_UCRED = struct.Struct("=iII")      # struct ucred {pid_t pid; uid_t uid; gid_t gid}


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    """The connected peer's pid/uid/gid (SO_PEERCRED, taken by the kernel at connect time)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer(*_UCRED.unpack(raw))


def parse_target(spec: str) -> str:
    """'unix:PATH' -> PATH (UserError for anything else)."""
    if not isinstance(spec, str) or not spec.startswith("unix:") or len(spec) <= 5:
        raise UserError(f"{spec!r}: expected unix:PATH", "introspection socket")
    path = spec[5:]
    if len(os.fsencode(path)) > 107:
        raise UserError(f"{path!r}: a unix socket path is at most 107 bytes",
                        "introspection socket")
    return path


def _lookup(kind: str) -> tuple[dict[str, int], frozenset]:
    """Accepted spellings: commands NAME, KVMI_NAME; events NAME, EVENT_NAME, VCPU_EVENT_NAME
    (VM_EVENT_NAME for UNHOOK) and the same with KVMI_.  NAME is the v12 name, or the kvmi-v7
    (libkvmi) name, which stands for the v12 command or event of the same meaning (e.g.
    CONTROL_MSR = VCPU_CONTROL_MSR, GET_GUEST_INFO and GET_MAX_GFN = VM_GET_INFO)."""
    table: dict[str, int] = {}
    if kind == "command":
        for i, name in ids.COMMAND_NAMES.items():
            table[name] = table["KVMI_" + name] = i
        for route in V7.routes.values():
            if route.perm is not None:
                table.setdefault(route.name, route.perm)
                table.setdefault("KVMI_" + route.name, route.perm)
        return table, ids.COMMANDS
    for i, name in list(ids.EVENT_NAMES.items()) + [(e, w.name) for e, w in V7.event_ids.items()]:
        scope = "VCPU_EVENT_" if i & 1 else "VM_EVENT_"
        for alias in (name, "EVENT_" + name, scope + name):
            table.setdefault(alias, i)
            table.setdefault("KVMI_" + alias, i)
    return table, ids.EVENTS


def parse_ids(words: Iterable[str] | None, kind: str) -> list[int]:
    """Allow-list words (names, numbers, 'all'; commas split too) -> ids, [-1] for all.

    `kind` is "command" or "event".  Unknown names/ids: UserError naming close matches.
    """
    import difflib
    table, known = _lookup(kind)
    out: list[int] = []
    for word in words or ():
        for w in str(word).split(","):
            w = w.strip()
            if not w:
                continue
            if w.lower() == "all":
                return [-1]
            try:
                n = int(w, 0)
            except ValueError:
                n = table.get(w.upper().replace("-", "_"))
                if n is None:
                    hint = difflib.get_close_matches(
                        w.upper(), [k for k in table if not k.startswith("KVMI_")], 3)
                    raise UserError(f"unknown {kind} {w!r}"
                                    + (f"; did you mean {', '.join(hint)}?" if hint else ""),
                                    f"--allow-{kind}s") from None
            else:
                if n not in known:
                    raise UserError(f"unknown {kind} id {n}", f"--allow-{kind}s")
            if n not in out:
                out.append(n)
    return out


class IntrospectionListener:
    """Listens on a unix socket and hooks the tool that connects (see the module docstring)."""

    def __init__(self, machine, path: str, commands: Iterable[int] = (),
                 events: Iterable[int] = (), *, uids: Iterable[int] | None = None,
                 event_timeout: float | None = None, unhook_wait: float = 1.0,
                 abi: Dialect = V12):
        self.machine = machine
        self.abi = abi
        self.path = path
        self.commands = tuple(commands)
        self.events = tuple(events)
        self.uids = frozenset(uids) if uids is not None else frozenset({os.geteuid()})
        self.unhook_wait = unhook_wait
        self.intro = attach(machine)
        if event_timeout is not None:
            self.intro.event_timeout = event_timeout
        self.refused: list[tuple[Peer | None, str]] = []
        self.hooked: list[Peer] = []
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "IntrospectionListener":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(s.fileno(), 0o600)     # Linux: the socket file is created with this mode
            _clear_stale(self.path)
            try:
                s.bind(self.path)
            except OSError as exc:
                raise UserError(f"cannot listen on {self.path}: {exc.strerror}",
                                "introspection socket") from None
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._ino = (st.st_dev, st.st_ino)
            s.listen(LISTEN_BACKLOG)
        except BaseException:
            s.close()
            raise
        self._sock = s
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="kvmi-listener",
                                        daemon=True)
        self._thread.start()
        log.info("introspection: listening on %s", self.path)
        return self

    def close(self) -> None:
        """Unhook the tool, stop listening, unlink the socket.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5.0)
        try:
            self.intro.unhook(wait=self.unhook_wait)
        except Exception:
            log.exception("introspection: unhook failed")
        if self._sock is not None:
            self._sock.close()
            self._unlink()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "IntrospectionListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self.intro.connected

    def _unlink(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    # --- accepting ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            except OSError:
                return
            if self._wake_r in ready or self._closed:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    self._offer(conn)
                except Exception:
                    log.exception("introspection: hooking a tool failed")

    def _refuse(self, peer: Peer | None, why: str) -> None:
        self.refused.append((peer, why))
        log.warning("introspection: refused %s: %s", peer, why)

    def _offer(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError as exc:
            return self._refuse(None, f"no peer credentials: {exc}")
        if peer.uid not in self.uids:
            return self._refuse(peer, f"uid {peer.uid} is not allowed")
        intro = self.intro
        if intro.connected:
            return self._refuse(peer, "a tool is already hooked")
        if intro.hooked:                 # the previous tool went away: start afresh
            intro.unhook()
        self.hooked.append(peer)
        try:
            intro.hook(conn, _uuid.uuid4(), commands=self.commands, events=self.events,
                       abi=self.abi)
        except BaseException:
            self.hooked.pop()
            raise
        log.info("introspection: hooked tool pid %d uid %d", peer.pid, peer.uid)


def _clear_stale(path: str) -> None:
    """Remove a socket nobody listens on; refuse to replace anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(f"{path} exists and is not a socket", "introspection socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise UserError(f"{path}: {exc.strerror}", "introspection socket") from None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    finally:
        probe.close()
    raise UserError(f"{path} is in use by another process", "introspection socket")
