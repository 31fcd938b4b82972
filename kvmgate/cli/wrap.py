"""`kvmgate wrap [options] -- VMM [ARGS...]`: a VMM (QEMU) under a policy through the shim."""
from __future__ import annotations

import json
import sys

from ..errors import UserError
from .common import out_path
from .introspect import add_run_arguments, read_key


def cmd_wrap(a) -> int:
    from ..wrap import Wrap, as_json, report
    from ..wrap.session import IntrospectOptions
    argv = list(a.vmm)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if a.learn:
        out_path(a.learn, "learned policy")
    intro = None
    if a.introspect:
        intro = IntrospectOptions.parse(a.introspect, a.kvmi_abi, a.allow_commands,
                                        a.allow_events, read_key(a.introspect_key))
    elif a.kvmi_abi or a.introspect_key or a.allow_commands or a.allow_events:
        raise UserError("--kvmi-abi, --introspect-key, --allow-commands, --allow-events: only "
                        "with --introspect", "kvmgate wrap")
    w = Wrap(argv, policy=a.policy, audit=a.audit, mode=a.mode, learn=a.learn, introspect=intro)
    w.start()
    w.install_signal_handlers()
    r = w.wait()
    if a.json:
        print(json.dumps(as_json(r)), file=sys.stderr)
    else:
        report(r, sys.stderr)
    return r.returncode


def register(sub) -> None:
    p = sub.add_parser("wrap", help="run a VMM (QEMU) under a policy: kvmgate wrap [options] -- VMM ...")
    p.add_argument("--policy", help="TOML policy file (SIGHUP reloads it into the running VM); "
                                    "without it nothing is denied")
    p.add_argument("--audit", help="append JSON Lines audit records to this file")
    p.add_argument("--mode", choices=("enforce", "audit"),
                   help="audit: log what the policy would deny and let it happen (default: the "
                        "policy's [policy] mode, else enforce)")
    p.add_argument("--learn", metavar="OUT.toml", help="record every MSR access of the VM (no policy) and "
                                                        "write the minimal policy that lets it run")
    p.add_argument("--json", action="store_true", help="run-end counters as one JSON line on stderr")
    add_run_arguments(p)
    p.add_argument("vmm", nargs="...", metavar="-- VMM [ARGS...]")
    p.set_defaults(fn=cmd_wrap)
    r = sub.add_parser("reload", help="reload the policy of a libvirt domain started through kvmgate-qemu")
    r.add_argument("domain")
    r.set_defaults(fn=cmd_reload)


def cmd_reload(a) -> int:
    import os

    from ..wrap.domain import reload_domain
    pid = reload_domain(a.domain, os.environ.get("KVMGATE_DOMAINS", "/etc/kvmgate/domains"),
                        os.environ.get("KVMGATE_RUN_DIR", "/run/kvmgate"))
    print(f"kvmgate: asked process {pid} to reload the policy of domain {a.domain}; the outcome "
          "is in the domain's log (kvmgate: reloaded ... / reload refused ...)")
    return 0
