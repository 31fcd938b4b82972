"""`kvmgate wrap [options] -- VMM [ARGS...]`: a VMM (QEMU) under a policy through the shim."""
from __future__ import annotations

import json
import sys

from ..errors import UserError
from .common import out_path, port_number, writable_file
from .introspect import add_run_arguments, read_key

METRICS_EVERY = 5.0          # seconds between textfile writes (--metrics-file)


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
    reloads = None
    if a.metrics_port is not None or a.metrics_file:
        from ..metrics import Reloads
        reloads = Reloads()
    w = Wrap(argv, policy=a.policy, audit=a.audit, mode=a.mode, learn=a.learn, introspect=intro,
             reload_counter=reloads)
    metrics = _metrics(a, w, reloads)
    try:
        w.start()
        w.install_signal_handlers()
        r = w.wait()
    finally:
        if metrics is not None:
            metrics.close(a.metrics_file)        # the final counts, after wait(), written last
    if a.json:
        print(json.dumps(as_json(r)), file=sys.stderr)
    else:
        report(r, sys.stderr)
    return r.returncode


def _metrics(a, w, reloads):
    """Prometheus metrics of the wrapped VM on --metrics-port / --metrics-file, or None: the
    decisions (drained audit rings + the shim's shared-memory counts), MSR exits per vCPU,
    audit records written and suppressed, reloads (kvmgate/metrics.py)."""
    if reloads is None:
        return None
    from ..metrics import Metrics
    metrics = Metrics(audit=w.audit, exits=w.exits_by_vcpu, reloads=reloads, decisions=w.decisions)
    if a.metrics_port is not None:
        port = metrics.serve(a.metrics_port, a.metrics_addr)
        print(f"kvmgate: metrics on http://{a.metrics_addr}:{port}/metrics", file=sys.stderr, flush=True)
    if a.metrics_file:
        metrics.write_every(a.metrics_file, METRICS_EVERY)
    return metrics


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
    p.add_argument("--metrics-port", type=port_number,
                   help="serve Prometheus metrics on this port (0: any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port")
    p.add_argument("--metrics-file", type=writable_file("metrics file"),
                   help="write Prometheus metrics to this file (node_exporter textfile) every "
                        f"{METRICS_EVERY:g} s and at the end")
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
