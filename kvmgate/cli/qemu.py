"""`kvmgate-qemu`: a libvirt domain's `<emulator>`.  It execs QEMU with the kvmgate shim and the
domain's policy (kvmgate.wrap.domain), or refuses to start QEMU with the reason on stderr (the
domain log, which `virsh start` shows).  libvirt's capability probes (no `-name`, `-machine
none`) run the real QEMU untouched; any other command line without `-name` is refused."""
from __future__ import annotations

import os
import sys

from ..errors import UserError


def main(argv: list[str] | None = None) -> int:
    from ..wrap import Wrap
    from ..wrap.domain import (
        QEMU,
        check_loadable,
        check_readable,
        domain_name,
        is_probe,
        load_domain,
    )
    from ..wrap.library import shim_path
    args = sys.argv[1:] if argv is None else list(argv)
    domains = os.environ.get("KVMGATE_DOMAINS", "/etc/kvmgate/domains")   # tests; libvirt clears it
    run_dir = os.environ.get("KVMGATE_RUN_DIR", "/run/kvmgate")
    name = domain_name(args)
    if name is None:
        if not is_probe(args):
            print("kvmgate-qemu: no -name guest=NAME: which domain's policy applies is unknown; "
                  "QEMU is not started", file=sys.stderr)
            return 1
        qemu = os.environ.get("KVMGATE_QEMU", QEMU)
        os.execv(qemu, [qemu, *args])
    try:
        cfg = load_domain(name, domains, run_dir)
        shim = shim_path()
        check_readable(str(shim), "the kvmgate shim library")
        check_loadable(str(shim), "the kvmgate shim library")
        check_readable(cfg.policy, "the domain's policy")
        w = Wrap([cfg.qemu, *args], policy=cfg.policy, audit=cfg.audit, mode=cfg.mode)
        w.announce = {"domain": name}
        pidfile = cfg.pidfile
        try:
            os.makedirs(os.path.dirname(pidfile), exist_ok=True)
            open(pidfile, "a").close()
        except OSError as e:
            print(f"kvmgate-qemu: domain {name}: {pidfile}: {e.strerror}; `kvmgate reload {name}` "
                  "will not work", file=sys.stderr)
            pidfile = None
    except UserError as e:
        print(f"kvmgate-qemu: domain {name}: {e}; QEMU is not started", file=sys.stderr)
        return 1
    except OSError as e:                  # e.g. the audit file the QEMU user may not write
        print(f"kvmgate-qemu: domain {name}: {e.filename}: {e.strerror} (uid {os.getuid()}); "
              "QEMU is not started", file=sys.stderr)
        return 1
    print(f"kvmgate-qemu: domain {name}: policy {cfg.policy} (settings {cfg.source})",
          file=sys.stderr, flush=True)
    w.exec_vmm(pidfile)
    return 1                                  # not reached: exec_vmm replaces this process


if __name__ == "__main__":
    sys.exit(main())
