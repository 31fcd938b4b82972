"""Every citation of docs/ in the code, the tests and the README points at something the
document has: `docs/NAME.md §N` (or §N-§M, §N.M) at a heading "N." / "N.M", and
`docs/NAME.md, "TITLE"` (several: `"A" and "B"`) at a heading starting with TITLE."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

CITE = re.compile(r'docs/([\w-]+\.md)(?P<rest>,? *(?:§[\d.]+(?: *- *§[\d.]+)?|"[^"]+"(?:(?: and |, )"[^"]+")*))?')
WRAP = re.compile(r"\n[ \t]*(?:#+ ?|\* ?|// ?)?")         # a citation wrapped in a comment or docstring


def headings(doc: Path) -> list[str]:
    return [" ".join(line.lstrip("#").split()) for line in doc.read_text().splitlines()
            if line.startswith("#")]


def sources():
    for pattern in ("kvmgate/**/*.py", "csrc/*.[ch]", "tests/**/*.py", "README.md", "docs/*.md"):
        for p in sorted(ROOT.glob(pattern)):
            if p != Path(__file__):
                yield p


def citations(text: str):
    """(document, kind, target) per citation: kind "section" (N or N.M) or "title"."""
    flat = WRAP.sub(" ", text)
    for m in CITE.finditer(flat):
        rest = m["rest"] or ""
        for a, b in re.findall(r"§([\d.]+)(?: *- *§([\d.]+))?", rest):
            for s in (a, b):
                if s:
                    yield m[1], "section", s.rstrip(".")
        for title in re.findall(r'"([^"]+)"', rest):
            yield m[1], "title", " ".join(title.split())
        if not rest:
            yield m[1], "document", ""


def broken(path: Path) -> list[str]:
    out = []
    name = path.relative_to(ROOT) if ROOT in path.parents else path.name
    for doc, kind, target in citations(path.read_text(errors="replace")):
        f = DOCS / doc
        if not f.is_file():
            out.append(f"{name}: docs/{doc} does not exist")
            continue
        heads = headings(f)
        if kind == "section" and not any(h.startswith(target + ". ") for h in heads):
            out.append(f"{name}: docs/{doc} has no section {target}")
        if kind == "title" and not any(h.startswith(target) for h in heads):
            out.append(f"{name}: docs/{doc} has no heading {target!r}")
    return out


def test_the_checker_sees_broken_and_good_citations(tmp_path):
    p = tmp_path / "x.py"
    p.write_text('"""docs/kvm-msr.md §3, docs/kvm-msr.md §9, docs/none.md,\n'
                 '   docs/kvm-msr.md, "4. Exits to user\n   space" and "no such heading",\n'
                 '   docs/introspection.md §2-§3, docs/kvm-msr.md §3.1"""\n')
    found = [b.split(": ", 1)[1] for b in broken(p)]
    assert found == ["docs/kvm-msr.md has no section 9", "docs/none.md does not exist",
                     "docs/kvm-msr.md has no heading 'no such heading'",
                     "docs/kvm-msr.md has no section 3.1"]


def test_every_docs_citation_resolves():
    bad = [b for p in sources() for b in broken(p)]
    assert not bad, "\n".join(bad)
