"""Exception classes shared by every layer (the bottom of the import graph)."""
from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """A KVM request failed: carries the errno, the ioctl name and the object it was made on."""

    def __init__(self, err: int, ioctl: str, obj: object = None, detail: str | None = None):
        msg = f"{ioctl} on {obj!r}: {detail or os.strerror(err)}" if obj is not None \
            else f"{ioctl}: {detail or os.strerror(err)}"
        super().__init__(err, msg)
        self.ioctl = ioctl
        self.obj = obj


class FilterError(KvmError):
    """An MSR filter the kernel would reject, found before any ioctl (same errno as the kernel)."""

    def __init__(self, detail: str, err: int = _errno.EINVAL):
        super().__init__(err, "KVM_X86_SET_MSR_FILTER", None, detail)


class UserError(Exception):
    """Bad input from a person (policy file, CLI argument): exit code 2, no traceback.

    `where` names the file and line (or rule), `what` says what is wrong and what to change.
    """

    def __init__(self, what: str, where: str | None = None):
        super().__init__(f"{where}: {what}" if where else what)
        self.what = what
        self.where = where


class PolicyError(UserError):
    """A policy file that cannot be parsed, resolved or compiled."""


class InputFileError(UserError):
    """A file given by a person cannot be used: missing, not a regular file, too large, or not
    in the expected encoding (kvmgate.inputs.read_user_file)."""


class GuestFileError(UserError):
    """A guest program file that cannot be loaded: unknown suffix, not ASCII, too large."""


class AsmError(GuestFileError):
    """A guest program that does not assemble (GNU as said why), or assembles to too much."""


class BadArgument(UserError):
    """A command-line argument with a value kvmgate cannot use (checked before anything runs)."""


class InjectGP(Exception):
    """Raised (or returned as a class) by an MSR handler: the guest gets #GP(0)."""
