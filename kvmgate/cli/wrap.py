"""`kvmgate wrap [options] -- VMM [ARGS...]`: a VMM (QEMU) under a policy through the shim."""
from __future__ import annotations

import json
import sys

from ..errors import UserError
from ..report import table


def cmd_wrap(a) -> int:
    from ..wrap import Wrap
    argv = list(a.vmm)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if a.learn:
        raise UserError("--learn is not available in wrap yet", "argument --learn")
    w = Wrap(argv, policy=a.policy, audit=a.audit, mode=a.mode)
    w.start()
    w.install_signal_handlers()
    r = w.wait()
    err = sys.stderr
    if a.json:
        print(json.dumps({"returncode": r.returncode, "policy_active": r.active,
                          "failures": r.failures, "exits": r.exits, "audit": r.audit,
                          "reloads": r.reloads, "decisions": r.summary}), file=err)
        return r.returncode
    e = r.exits
    print(f"kvmgate: VMM exited with code {r.returncode}: MSR exits {e['policy']} answered by "
          f"the policy, {e['vmm']} by the VMM, {e['gp']} #GP (nobody asked), {e['host']} "
          f"carried out as KVM would; audit records {r.audit['written']} written, "
          f"{r.audit['suppressed']} suppressed, {r.audit['ring_dropped']} dropped (ring full)",
          file=err)
    if r.summary:
        table(r.summary, out=err)
    return r.returncode


def register(sub) -> None:
    p = sub.add_parser("wrap", help="run a VMM (QEMU) under a policy: kvmgate wrap [options] -- VMM ...")
    p.add_argument("--policy", help="TOML policy file (SIGHUP reloads it into the running VM); "
                                    "without it nothing is denied")
    p.add_argument("--audit", help="append JSON Lines audit records to this file")
    p.add_argument("--mode", choices=("enforce", "audit"),
                   help="audit: log what the policy would deny and let it happen (default: the "
                        "policy's [policy] mode, else enforce)")
    p.add_argument("--learn", metavar="OUT.toml", help="(not yet) write the minimal policy")
    p.add_argument("--json", action="store_true", help="run-end counters as one JSON line on stderr")
    p.add_argument("vmm", nargs="...", metavar="-- VMM [ARGS...]")
    p.set_defaults(fn=cmd_wrap)
