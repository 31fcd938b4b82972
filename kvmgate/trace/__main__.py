"""`python -m kvmgate.trace bench [--events N] [--json]`."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "bench":
        print("usage: python -m kvmgate.trace bench [--events N] [--sample N] [--chunk-events N] "
              "[--repeat N] [--json]", file=sys.stderr)
        return 2
    from .bench import main as bench_main
    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
