"""Where the shim (csrc/shim.c + csrc/engine.c, an LD_PRELOAD library) is.

`pip install .` builds it into the package as kvmgate/wrap/_kvmgate_shim*.so (setup.py).  In a
source checkout that was never built (running from the worktree), it is compiled once with the
same flags into build/kvmgate-shim/ next to csrc/ (atomically: concurrent runs are safe)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import UserError

HERE = Path(__file__).resolve().parent
SOURCES = ("shim.c", "engine.c")
HEADERS = ("shim_abi.h", "engine.h")
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared"]


def packaged() -> Path | None:
    hits = sorted(HERE.glob("_kvmgate_shim*.so"))
    return hits[0] if hits else None


def source_dir() -> Path | None:
    c = HERE.parent.parent / "csrc"
    return c if all((c / f).is_file() for f in SOURCES + HEADERS) else None


def build_from_source(csrc: Path) -> Path:
    """Compile the shim from a source checkout into build/kvmgate-shim/ (keyed by content)."""
    digest = hashlib.sha256()
    for f in SOURCES + HEADERS:
        digest.update((csrc / f).read_bytes())
    out_dir = csrc.parent / "build" / "kvmgate-shim"
    out = out_dir / f"shim-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise UserError("the kvmgate shim is not built and there is no C compiler to build it "
                        "(pip install . with gcc)", str(csrc))
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-I", str(csrc), "-o", tmp,
                            *(str(csrc / f) for f in SOURCES), "-ldl", "-lpthread"],
                           check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"building the kvmgate shim failed:\n{r.stderr.strip()}", str(csrc))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


ENV = "KVMGATE_SHIM_LIBRARY"     # a shim library at another place (tests, packagers)


def shim_path() -> Path:
    """The shim library to preload: $KVMGATE_SHIM_LIBRARY, else the packaged one, else one
    built from the checkout."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    p = packaged()
    src = source_dir()
    if p is not None and (src is None or p.stat().st_mtime >= max(
            (src / f).stat().st_mtime for f in SOURCES + HEADERS)):
        return p                            # installed, or built in place and up to date
    if src is None:
        raise UserError("the kvmgate shim library is missing: reinstall kvmgate with a C "
                        "compiler (pip install .)", str(HERE))
    return build_from_source(src)
