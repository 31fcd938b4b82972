"""Imports go only downward through the layers (lazy imports inside functions included)."""
import ast
import functools
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "kvmgate"
LAYERS = [
    {"uapi", "errors", "report", "schemas", "inputs", "argtypes"},  # ABI facts, errors, tables, user files, options
    {"kvm", "vcpu_exit", "asm", "hostinfo", "signal_pipe"},    # fds, ioctls, decoded exits; the assembler; signals as fds
    {"msr"},                                                   # the pure MSR model
    {"guest", "exits", "vm", "machine"},                       # guests, the machine and its exit loop
    {"policy", "audit", "probe", "trace", "introspection", "learn", "demo", "supervise", "metrics",
     "image", "engine", "wrap"},
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


# ---- import circles (issue 11 item 4) -------------------------------------------------------
# Module graph over every import, function-local ones included.  `from P import x` is an edge
# to P.x when that is a module, else to P; importing P.x from outside P also runs P/__init__.

# Circles known today, each listed by the function-local import that hides it.  Other helpers
# are removing them (issue 11 item 4); delete an entry when its fix lands - the test below
# says so when an entry no longer closes a circle.
KNOWN_CYCLE_EDGES = {
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _function_nodes(tree) -> set[int]:
    inside = set()
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(f) if n is not f)
    return inside


@functools.lru_cache(maxsize=1)
def import_graph():
    """{(importer, imported): (line, function_local)} over kvmgate's own modules."""
    mods = _modules()
    edges: dict[tuple[str, str], tuple[int, bool]] = {}
    for name, path in mods.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text())
        local = _function_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    dep = ".".join(parts[:k])
                    if dep in mods and dep != name and not name.startswith(dep + "."):
                        old = edges.get((name, dep))
                        is_local = id(node) in local
                        if old is None or (old[1] and not is_local):
                            edges[(name, dep)] = (node.lineno, is_local)
    return mods, edges


def _reaches(adj: dict, start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        for w in adj.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def _cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    adj: dict[str, list[str]] = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(adj.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(adj.get(w, ()))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_circle():
    edges = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")}
    assert _cycles(["a", "b", "c", "d", "e"], edges) == [["a", "b", "c"]]
    assert _cycles(["a", "b"], {("a", "b")}) == []


def test_no_import_circles():
    mods, edges = import_graph()
    live = {e for e in edges if e not in KNOWN_CYCLE_EDGES}
    found = _cycles(sorted(mods), live)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_function_local_import_hides_a_circle():
    mods, edges = import_graph()
    adj: dict[str, set[str]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
    hidden = [f"{mods[a].relative_to(PKG.parent)}:{line} imports {b} inside a function, and {b} "
              f"imports {a} back" for (a, b), (line, local) in sorted(edges.items())
              if local and (a, b) not in KNOWN_CYCLE_EDGES and _reaches(adj, b, a)]
    assert not hidden, "\n".join(hidden)


def test_known_circles_are_still_circles():
    """An entry of KNOWN_CYCLE_EDGES that no longer closes a circle must be deleted."""
    mods, edges = import_graph()
    adj: dict[str, set[str]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
    stale = [f"{a} -> {b}" for a, b in sorted(KNOWN_CYCLE_EDGES)
             if (a, b) not in edges or not _reaches(adj, b, a)]
    assert not stale, "fixed; delete from KNOWN_CYCLE_EDGES: " + ", ".join(stale)


# ---- small classes (issue 11: "no class over ~250 lines") ---------------------------------

MAX_CLASS_LINES = 250
# Classes over the bound, each with the ceiling it may not grow past; delete an entry when its
# split lands - the staleness test below says so.  None is left.
KNOWN_LARGE_CLASSES: dict[str, int] = {}


def class_sizes() -> dict[str, int]:
    """{"kvmgate/path.py:Class": lines} for every class in kvmgate/, nested ones included."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                out[f"{path.relative_to(PKG.parent)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_no_class_over_the_bound():
    sizes = class_sizes()
    big = [f"{name}: {n} lines" for name, n in sorted(sizes.items())
           if n > KNOWN_LARGE_CLASSES.get(name, MAX_CLASS_LINES)]
    assert not big, f"classes over {MAX_CLASS_LINES} lines (split them by concern):\n" + "\n".join(big)


def test_known_large_classes_are_still_large():
    sizes = class_sizes()
    stale = [name for name in KNOWN_LARGE_CLASSES if sizes.get(name, 0) <= MAX_CLASS_LINES]
    assert not stale, "now small enough; delete from KNOWN_LARGE_CLASSES: " + ", ".join(stale)


# ---- no access to another module's private names -------------------------------------------

NOT_PRIVATE = {"_replace", "_asdict", "_fields", "_make"}       # NamedTuple's public API


def _private(name: str) -> bool:
    """_name, but not __dunder__, ctypes' _fields_/_pack_ (`_x_`) or NamedTuple's methods."""
    return (name.startswith("_") and not name.endswith("_") and name not in NOT_PRIVATE)


def private_access(path: Path, only_imports: bool = False) -> list[str]:
    """`from kvmgate.m import _name`, and `x._name` where x is a name this file imported from
    kvmgate (a module or a class of another module).  self./cls., the file's own names and
    `from . import _m` (a private module of the file's own package, e.g. the C extension
    kvmgate.engine._engine) are its own business."""
    tree = ast.parse(path.read_text())
    imported: dict[str, str] = {}
    bad = []
    is_pkg = path.name == "__init__.py"
    in_pkg = PKG in path.parents
    here = (list(path.relative_to(PKG.parent).with_suffix("").parts) if in_pkg else [])
    pkg = here if is_pkg else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("kvmgate"):
                continue
            for a in node.names:
                if _private(a.name) and mod != ".".join(pkg):   # a package's own: its business
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} imports {a.name} from {mod}")
                imported[a.asname or a.name] = f"{mod}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kvmgate"):
                    imported[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
    if only_imports:
        return bad
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):      # kvmgate.trace.store._x: the root name
                if _private(base.attr):
                    break
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} uses {base.id}...{node.attr} "
                           f"({imported[base.id]})")
    return bad


def test_private_access_finder_finds_planted_uses(tmp_path):
    p = PKG / "_planted_for_test.py"
    assert not p.exists()
    src = ("from .trace.store import _x\nfrom .kvm import Kvm\nimport kvmgate.vm.machine\n"
           "class A:\n    def f(self):\n        return self._ok, Kvm._index_list, kvmgate.vm.machine._y\n")
    p.write_text(src)
    try:
        found = private_access(p)
    finally:
        p.unlink()
    assert len(found) == 3, found


def test_no_access_to_other_modules_private_names():
    bad = [b for path in sorted(PKG.rglob("*.py")) for b in private_access(path)]
    tests = PKG.parent / "tests"
    bad += [b for path in sorted(tests.rglob("*.py")) for b in private_access(path, only_imports=True)
            if "kvmgate" in b]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_readme_layering_section_is_this_list():
    """README's "### Layering" numbers the layers; each item's top-level names (backticked,
    outside parentheses) are exactly LAYERS' (the package's own __main__/__init__ aside)."""
    text = (PKG.parent / "README.md").read_text()
    section = text.split("### Layering\n", 1)[1].split("\n#", 1)[0]
    listing = section[section.index("\n1. "):].split("\n\n")[0]
    items = re.split(r"\n\d+\. ", listing)[1:]
    got = []
    for item in items:
        flat = " ".join(item.split())
        while re.search(r"\([^()]*\)", flat):
            flat = re.sub(r"\([^()]*\)", "", flat)
        got.append(set(re.findall(r"`([\w.]+)`", flat)))
    want = [names - {"__main__", "__init__"} for names in LAYERS]
    assert got == want
