"""`python -m kvmgate.trace bench [--events N] [--rounds N] [--json]`: replay vs DuckDB."""
import sys

from .bench import main as bench_main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "bench":
        print("usage: python -m kvmgate.trace bench [--events N] [--rounds N] [--no-full] [--json]",
              file=sys.stderr)
        return 2
    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
