"""`kvmgate introspect unix:PATH watch-msr MSR...` (a tool on a VM's introspection socket) and
the `run` options that give a guest's introspection to a tool (kvmgate.introspection.serve).

Wiring (cli/run.py): `register(sub)` adds `introspect`; `add_run_arguments(p)` adds
--introspect, --kvmi-abi, --introspect-key, --allow-commands and --allow-events to `run`, whose
handler calls `serve_introspection(m, a)` and closes the handle when the run ends.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from .common import parse_msrs
from ..errors import UserError

WATCH_COMMANDS = ("VM_GET_INFO", "VCPU_CONTROL_EVENTS", "VCPU_CONTROL_MSR")
MAX_KEY = 4096


class _Done(Exception):
    """--count reached."""


def read_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a regular file", "--introspect-key")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY + 1)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}", "--introspect-key") from None
    if len(data) > MAX_KEY:
        raise UserError(f"{path}: more than {MAX_KEY} bytes", "--introspect-key")
    return data


def serve_introspection(machine, a):
    """Start serving `machine`'s introspection as the parsed `run` arguments `a` say; None
    without --introspect (UserError if introspection options were given without it)."""
    from ..introspection.session import serve
    if not a.introspect:
        given = [o for o, v in (("--kvmi-abi", a.kvmi_abi), ("--introspect-key", a.introspect_key),
                                ("--allow-commands", a.allow_commands),
                                ("--allow-events", a.allow_events)) if v]
        if given:
            raise UserError(f"{', '.join(given)}: only with --introspect", "kvmgate run")
        return None
    name = os.path.splitext(os.path.basename(a.guest))[0] if getattr(a, "guest", None) \
        else "kvmgate"
    return serve(machine, a.introspect, a.allow_commands, a.allow_events, abi=a.kvmi_abi,
                 name=name, key=read_key(a.introspect_key))


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The `run` options that serve_introspection takes."""
    g = p.add_argument_group("introspection (KVMI)")
    g.add_argument("--introspect", metavar="SPEC",
                   help="unix:PATH: listen there (mode 0600, same uid only) and hook the first "
                        "tool that connects; connect:unix:PATH or connect:vsock:CID:PORT: "
                        "connect to a listening tool (libkvmi's kvmi_init_unix_socket/"
                        "kvmi_init_vsock) with QEMU's handshake")
    g.add_argument("--kvmi-abi", choices=("v7", "v12"), default=None,
                   help="wire ABI: v7 = the kvmi-v7 branch libkvmi speaks (default with "
                        "connect:), v12 = the upstream patch series (default with unix:)")
    g.add_argument("--introspect-key", metavar="FILE",
                   help="connect mode: the tool must answer the handshake with the SHA-1 of "
                        "this file's bytes (QEMU's secret object)")
    g.add_argument("--allow-commands", action="append", default=[], metavar="CMD[,CMD...]",
                   help="commands the tool may use: names (VCPU_CONTROL_MSR, or libkvmi's "
                        "CONTROL_MSR), v12 ids (25) or 'all'; GET_VERSION and the two CHECK "
                        "commands are always allowed")
    g.add_argument("--allow-events", action="append", default=[], metavar="EV[,EV...]",
                   help="events the tool may use: MSR, PAUSE, UNHOOK, v12 ids or 'all'")


def _msr_label(index: int) -> str:
    from ..msr import names
    return names.msr_name(index) or f"{index:#x}"


def _connect(path: str, timeout: float):
    from ..introspection import Client
    try:
        return Client.connect(path, timeout=timeout)
    except FileNotFoundError:
        raise UserError(f"no introspection socket at {path}", "introspect") from None
    except (ConnectionRefusedError, PermissionError) as e:
        raise UserError(f"cannot connect to {path}: {e.strerror}", "introspect") from None
    except socket.timeout:
        raise UserError(f"connecting to {path} timed out", "introspect") from None


def _vcpus(c, wanted: list[int] | None) -> list[int]:
    """The vCPUs to watch: --vcpu, else all (VM_GET_INFO, else probing indexes)."""
    from ..introspection import IntrospectionError, ids
    if wanted:
        return wanted
    try:
        return list(range(c.get_info()))
    except IntrospectionError as e:
        if e.code != -ids.KVM_EPERM:
            raise
    out = []
    while len(out) < 4096:     # VM_GET_INFO not allowed: a bad index gives -KVM_EINVAL
        try:
            c.vcpu_control_events(len(out), ids.VCPU_EVENT_MSR, True)
        except IntrospectionError as e:
            if e.code == -ids.KVM_EINVAL:
                break
            raise
        out.append(len(out))
    return out


def cmd_watch_msr(a) -> int:
    from ..introspection import IntrospectionError, ids
    from ..introspection.listener import parse_target
    path = parse_target(a.target)
    msrs = parse_msrs(a.msrs)
    c = _connect(path, a.connect_timeout)
    seen = 0
    try:
        try:
            c.get_version()
            try:
                c.control_events(ids.VM_EVENT_UNHOOK, True)   # leave cleanly on unhook
            except IntrospectionError:
                pass
            vcpus = _vcpus(c, a.vcpu)
            for v in vcpus:
                c.vcpu_control_events(v, ids.VCPU_EVENT_MSR, True)
                for msr in msrs:
                    c.control_msr(v, msr, True)
        except IntrospectionError as e:
            what = ids.command_name(e.command)
            hint = " (the VM owner must allow it: --allow-commands/--allow-events)" \
                if e.code == -ids.KVM_EPERM else ""
            print(f"kvmgate: {what}: {e.name}{hint}", file=sys.stderr)
            return 1
        except (ConnectionError, OSError) as e:
            print(f"kvmgate: introspection connection lost: {e}", file=sys.stderr)
            return 1
        if not a.json:
            print(f"watching {', '.join(_msr_label(m) for m in msrs)} on vCPU "
                  f"{', '.join(map(str, vcpus))}" + (" (reverting writes)" if a.deny else ""),
                  file=sys.stderr, flush=True)
        c.sock.settimeout(None)

        def on_msr(ev):
            nonlocal seen
            value = ev.old if a.deny else ev.new
            ev.reply_msr(value)
            seen += 1
            if a.json:
                print(json.dumps({"vcpu": ev.vcpu, "msr": f"{ev.msr:#x}",
                                  "name": _msr_label(ev.msr), "old": f"{ev.old:#x}",
                                  "new": f"{ev.new:#x}",
                                  "action": "revert" if a.deny else "allow"}), flush=True)
            else:
                print(f"vcpu {ev.vcpu} {_msr_label(ev.msr)} ({ev.msr:#x}): {ev.old:#x} -> "
                      f"{ev.new:#x}" + (f"  reverted to {ev.old:#x}" if a.deny else ""),
                      flush=True)
            if a.count and seen >= a.count:
                raise _Done

        try:
            end = c.serve(on_msr=on_msr)
        except _Done:
            end = "count"
        except (ConnectionError, OSError) as e:
            end = f"connection lost: {e}"
        if not a.json:
            print(f"{seen} MSR write events; {end}", file=sys.stderr)
        return 0
    finally:
        c.close()


def register(subparsers) -> argparse.ArgumentParser:
    """Add `introspect` to kvmgate's subcommands."""
    p = subparsers.add_parser("introspect", help="act as an introspection tool on a VM's socket")
    p.add_argument("target", metavar="unix:PATH", help="the socket of `kvmgate run --introspect`")
    isub = p.add_subparsers(dest="icmd", required=True, metavar="ACTION")
    w = isub.add_parser("watch-msr", help="print guest writes to MSRs (needs VCPU_CONTROL_MSR, "
                                          "VCPU_CONTROL_EVENTS and the MSR event allowed)")
    w.add_argument("msrs", nargs="+", metavar="MSR", help="names (LSTAR) or indices (0xc0000082)")
    w.add_argument("--deny", action="store_true", help="revert each write (keep the old value)")
    w.add_argument("--json", action="store_true", help="one JSON object per event")
    w.add_argument("--vcpu", type=int, action="append", help="watch only this vCPU (repeatable)")
    w.add_argument("--count", type=int, default=0, help="exit after N events")
    w.add_argument("--connect-timeout", type=float, default=5.0)
    w.set_defaults(fn=cmd_watch_msr)
    return p
