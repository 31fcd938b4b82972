"""The one way kvmgate reads a file a person names (policy, guest program): regular files only,
with a size bound, and every failure an InputFileError naming the file.

Opening uses O_NONBLOCK, so a FIFO never blocks the open, and the type is checked on the open
descriptor (fstat), so what is read is what was checked: /dev/zero, a FIFO, a socket or a
directory is refused at once instead of hanging or reading without end.
"""
from __future__ import annotations

import os
import stat

from .errors import InputFileError

MiB = 1 << 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(name: str, what: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InputFileError(f"cannot read {what}: {e.strerror}", name) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputFileError(f"cannot read {what}: {_kind(st.st_mode)}, not a regular file", name)
    return fd, st


def check_user_file(path, what: str) -> None:
    """InputFileError unless `path` is a regular file this process can open for reading
    (checked without reading it and without blocking on a FIFO)."""
    fd, _ = _open_regular(os.fspath(path), what)
    os.close(fd)


def read_user_file(path, what: str, limit: int) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them; else InputFileError naming
    `what` ("policy", "guest program") and the file."""
    name = os.fspath(path)
    fd, st = _open_regular(name, what)
    try:
        if st.st_size > limit:
            raise InputFileError(f"{what} is {st.st_size} bytes; at most {limit} are accepted", name)
        chunks, size = [], 0
        while size <= limit:
            try:
                b = os.read(fd, min(limit + 1 - size, MiB))
            except OSError as e:
                raise InputFileError(f"cannot read {what}: {e.strerror}", name) from None
            if not b:
                break
            chunks.append(b)
            size += len(b)
        if size > limit:
            raise InputFileError(f"{what} grew past {limit} bytes while being read", name)
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_text(data: bytes, name: str, what: str, encoding: str = "utf-8") -> str:
    """`data` as text; InputFileError at the line and column of the first byte that is not
    `encoding` (utf-8 or ascii)."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputFileError(f"{what} is not {encoding.upper()} text: byte {data[e.start]:#04x} at "
                             f"column {col}", f"{name}:{line}") from None
