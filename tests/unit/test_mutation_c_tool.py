"""tools/mutation_c.py's mutant generator (pure): which mutants it plants in C source, and
that comments, strings and code outside function bodies are left alone."""
import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "mutation_c.py"
sys.path.insert(0, str(TOOL.parent))     # as when run as a script: it imports tools/mutation.py
spec = importlib.util.spec_from_file_location("mutation_c", TOOL)
mc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mc)

SRC = """\
/* a comment with == and < and x = 1; */
#include <time.h>
static const int table[2] = {1, 2};

static int f(const struct s *p, int a, int b)
{
    if (a == b && p->x < 3)     /* a < b here is a comment */
        return 1;
    a |= b + 1;
    for (;;)
        break;
    return 0;
}

const char *g(int code)
{
    return "a == b";
}
"""


def gen(names=None):
    return [(n + 1, fn, new.strip(), what) for n, fn, new, what in
            mc.mutants(SRC.splitlines(), names)]


def test_functions_are_found_with_their_bodies():
    assert mc.functions(SRC.splitlines()) == {"f": (6, 11), "g": (16, 16)}    # 0-based body lines


def test_the_planted_mutants_are_exactly_the_expected_ones():
    got = {(line, new, what) for line, fn, new, what in gen(["f"])}
    assert got == {
        (7, "if (a != b && p->x < 3)     /* a < b here is a comment */", "== -> !="),
        (7, "if (a == b && p->x <= 3)     /* a < b here is a comment */", "< -> <="),
        (7, "if (a == b || p->x < 3)     /* a < b here is a comment */", "&& -> ||"),
        (7, "if (!(a == b && p->x < 3))     /* a < b here is a comment */",
         "if condition negated"),
        (8, "return 0;", "return 1; -> return 0;"),
        (9, "a |= b - 1;", " +  ->  - "),
        (9, "", "statement deleted"),
        (11, "", "statement deleted"),
        (12, "return 1;", "return 0; -> return 1;"),
    }


def test_strings_comments_and_non_function_code_are_never_mutated():
    assert gen(["g"]) == []                    # the only body line holds a string
    assert all(fn == "f" for _line, fn, _new, _what in gen())
    assert all(line not in (1, 2, 3) for line, *_ in gen())


def test_skip_list_applies_only_without_an_explicit_function_list():
    names = {fn for _l, fn, _n, _w in mc.mutants(
        (TOOL.parents[1] / "csrc" / "engine.c").read_text().splitlines(), None)}
    assert "kg_decide" in names and "refused" in names and "kg_strerror" not in names
