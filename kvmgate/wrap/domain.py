"""libvirt's `<emulator>`: which domain a QEMU command line starts, and that domain's kvmgate
settings (/etc/kvmgate/domains/NAME.toml).

libvirt starts the emulator with `-name guest=NAME,debug-threads=on` (a comma inside NAME is
doubled: `guest=a,,b`) and clears the environment; its capability probes (`-machine none`,
`-qmp`, `-daemonize`) carry no `-name`.  Per-domain settings:

    policy = "/etc/kvmgate/policies/web.toml"   # required
    audit = "/var/log/kvmgate/web.jsonl"        # optional: JSON Lines audit (QEMU's user writes it)
    mode = "enforce"                            # optional: enforce | audit
    qemu = "/usr/bin/qemu-system-x86_64"        # optional: the real emulator
    pidfile = "/run/kvmgate/web.pid"            # optional: for `kvmgate reload web`
"""
from __future__ import annotations

import ctypes
import os
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DOMAINS_DIR = "/etc/kvmgate/domains"
RUN_DIR = "/run/kvmgate"
QEMU = "/usr/bin/qemu-system-x86_64"
KEYS = {"policy", "audit", "mode", "qemu", "pidfile"}


def split_option(value: str) -> list[str]:
    """QEMU's option syntax: parts separated by ',', a doubled ',,' is a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(value[i])
        i += 1
    parts.append("".join(cur))
    return parts


def domain_name(argv: list[str]) -> str | None:
    """The domain of a QEMU command line (`-name guest=NAME,...` or `-name NAME`); None for
    libvirt's capability probes, which have no -name."""
    for i, a in enumerate(argv[:-1]):
        if a in ("-name", "--name"):
            parts = split_option(argv[i + 1])
            for p in parts:
                if p.startswith("guest="):
                    return p[len("guest="):]
            return parts[0] if parts and "=" not in parts[0] else None
    return None


INFO_ONLY = {"-version", "--version", "-help", "--help", "-h"}


def is_probe(argv: list[str]) -> bool:
    """A QEMU command line that runs no guest: libvirt's capability probes (`-machine
    none,accel=...` with `-qmp`) or `-version`/`-help`.  Only these run without a policy;
    anything else without `-name` is refused (fail closed)."""
    if argv and all(a in INFO_ONLY for a in argv):
        return True
    for i, a in enumerate(argv[:-1]):
        if a in ("-machine", "--machine", "-M"):
            parts = split_option(argv[i + 1])
            return parts[0] in ("none", "type=none") or "type=none" in parts
    return False


@dataclass(frozen=True)
class DomainConfig:
    name: str
    source: str
    policy: str
    audit: str | None
    mode: str | None
    qemu: str
    pidfile: str


def config_path(name: str, domains_dir: str = DOMAINS_DIR) -> Path:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise UserError(f"domain name {name!r} cannot name a settings file", "-name")
    return Path(domains_dir) / f"{name}.toml"


def load_domain(name: str, domains_dir: str = DOMAINS_DIR, run_dir: str = RUN_DIR) -> DomainConfig:
    """The domain's settings; a UserError naming the file and key for anything wrong."""
    path = config_path(name, domains_dir)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no kvmgate settings for domain {name!r} (create it with at least "
                        "policy = \"...\")", str(path)) from None
    except OSError as e:
        raise UserError(f"cannot read the domain's kvmgate settings: {e.strerror}", str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"not valid TOML: {e}", str(path)) from None
    unknown = set(doc) - KEYS
    if unknown:
        raise UserError(f"unknown keys {sorted(unknown)}; expected {sorted(KEYS)}", str(path))
    for k, v in doc.items():
        if not isinstance(v, str) or not v:
            raise UserError(f"{k} must be a non-empty string", f"{path}: {k}")
    if "policy" not in doc:
        raise UserError("policy = \"FILE\" is required", str(path))
    mode = doc.get("mode")
    if mode not in (None, "enforce", "audit"):
        raise UserError(f"mode {mode!r}: expected enforce or audit", f"{path}: mode")
    return DomainConfig(name, str(path), doc["policy"], doc.get("audit"), mode,
                        doc.get("qemu", QEMU), doc.get("pidfile", str(Path(run_dir) / f"{name}.pid")))


def check_readable(path: str, what: str) -> None:
    """As the user this runs as (libvirt: the QEMU user): ld.so silently skips a preload
    library it cannot read, so that must be found here, before QEMU starts."""
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} is not readable by uid {os.getuid()}", path)


def check_keeper(pid: int, pidfile: str) -> None:
    """The pidfile is written by QEMU's user (libvirt-qemu), and `kvmgate reload` runs as root:
    signal only a kvmgate-qemu keeper owned by the pidfile's owner, never a process a
    compromised QEMU named (SIGHUP ends many processes)."""
    try:
        owner = os.stat(pidfile).st_uid
        uid = os.stat(f"/proc/{pid}").st_uid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
    except FileNotFoundError:
        raise UserError(f"its kvmgate process {pid} is gone", pidfile) from None
    if uid != owner or not any(b"kvmgate" in a for a in argv):
        raise UserError(f"process {pid} is not a kvmgate-qemu process of uid {owner}; not "
                        "signalled", pidfile)


def check_loadable(path: str, what: str) -> None:
    """Map the library the way ld.so will map it for QEMU: as this user, under this process's
    LSM profile (libvirt applies the domain's AppArmor/SELinux label to the emulator, i.e. to
    kvmgate-qemu itself), with exec permission on its file system.  A readable file on a
    `noexec` mount, or one the profile does not let QEMU map, passes os.access but is silently
    skipped by ld.so ("cannot be preloaded ... ignored").  The shim's constructor does nothing
    without its KVMGATE_SHIM channel, and RTLD_LOCAL keeps its ioctl() out of this process."""
    try:
        ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
    except OSError as e:
        raise UserError(f"{what} cannot be loaded by uid {os.getuid()}: {e}", path) from None


def reload_domain(name: str, domains_dir: str = DOMAINS_DIR, run_dir: str = RUN_DIR) -> int:
    """SIGHUP to the domain's kvmgate keeper (pidfile, checked by check_keeper); returns its pid."""
    cfg = load_domain(name, domains_dir, run_dir)
    try:
        pid = int(Path(cfg.pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise UserError(f"domain {name!r} is not running under kvmgate (no pidfile)", cfg.pidfile) from None
    if pid <= 0:
        raise UserError(f"pid {pid} is not a process", cfg.pidfile)
    check_keeper(pid, cfg.pidfile)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise UserError(f"domain {name!r}: its kvmgate process {pid} is gone", cfg.pidfile) from None
    return pid
