"""Build hooks for `pip install .`: the C policy engine as an optional CPython extension.

Everything else about the package is in pyproject.toml.  Without a C compiler the extension is
skipped with a warning and kvmgate still installs (`kvmgate.engine.available()` is then False
and the Python exit path is used)."""
from setuptools import Extension, setup

# -ffp-contract=off: the audit drain's token bucket computes as Python floats do (no fused FMA)
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]

ENGINE = Extension(
    "kvmgate.engine._engine",
    sources=["csrc/engine.c", "csrc/runloop.c", "csrc/auditfmt.c", "csrc/engine_module.c",
             "csrc/loop_module.c", "csrc/kvmi_event.c", "csrc/event_module.c"],
    depends=["csrc/engine.h", "csrc/runloop.h", "csrc/auditfmt.h", "csrc/pymodule.h",
             "csrc/kvmi_event.h", "csrc/sorted.h"],
    include_dirs=["csrc"],
    extra_compile_args=CFLAGS,
    optional=True,
)

# The LD_PRELOAD shim of `kvmgate wrap` (csrc/shim.c + the engine): a plain shared library
# inside the VMM, never imported by Python; built like an extension so `pip install .` ships it
# in the package (kvmgate/wrap/library.py finds it).
SHIM = Extension(
    "kvmgate.wrap._kvmgate_shim",
    sources=["csrc/shim.c", "csrc/engine.c"],
    depends=["csrc/engine.h", "csrc/shim_abi.h", "csrc/sorted.h"],
    include_dirs=["csrc"],
    extra_compile_args=CFLAGS,
    libraries=["dl", "pthread"],
    optional=True,
)

setup(ext_modules=[ENGINE, SHIM])
