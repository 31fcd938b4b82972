"""Imports go only downward through the layers (lazy imports inside functions included)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "kvmgate"
LAYERS = [
    {"uapi", "errors", "report", "inputs"},                    # ABI facts, errors, table output, user files
    {"kvm", "asm", "hostinfo"},                                # fds and ioctls; the assembler
    {"msr"},                                                   # the pure MSR model
    {"guest", "exits", "machine"},                             # guests and the exit loop
    {"policy", "audit", "probe", "trace", "introspection", "learn", "demo"},
    {"cli", "bench", "__main__", "__init__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def top(module: str) -> str:
    """kvmgate.a.b -> a (the layer unit)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path):
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = list(rel.parts)
    if here[-1] == "__init__":
        here = here[:-1]
    pkg = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:                      # from . import a, b
                    for alias in node.names:
                        yield node.lineno, mod + "." + alias.name
                    continue
                yield node.lineno, mod
            elif node.module and node.module.startswith("kvmgate"):
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kvmgate"):
                    yield node.lineno, alias.name


def test_every_module_has_a_layer():
    units = {p.stem if p.parent == PKG else p.relative_to(PKG).parts[0] for p in PKG.rglob("*.py")}
    assert units <= set(LEVEL), units - set(LEVEL)


def test_imports_only_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        me = top(".".join(path.relative_to(PKG.parent).with_suffix("").parts))
        if path.parent == PKG and path.stem == "__init__":
            continue                                     # the package facade re-exports all
        for line, mod in imports(path):
            other = top(mod)
            if other in LEVEL and LEVEL[other] > LEVEL[me]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({me}, layer {LEVEL[me]}) "
                           f"imports {mod} (layer {LEVEL[other]})")
    assert not bad, "\n".join(bad)
