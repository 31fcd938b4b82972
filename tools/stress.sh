#!/bin/bash
# The whole suite, ROUNDS times in a row, in two fresh clones of COMMIT at the same time (the
# "passes N times beside a second copy of itself" check; not in CI).
#
#   tools/stress.sh [COMMIT] [ROUNDS] [WORKDIR]      # defaults: HEAD, 5, /tmp/kvmgate-stress
#
# Each clone gets its own virtualenv (pip install -e '.[test]').  Core dumps are allowed and
# pytest runs with faulthandler (its default), so a crash leaves a Python traceback and a core.
# Per round and copy: WORKDIR/roundR.{a,b}.txt (the pytest output, slowest tests, exit status);
# WORKDIR/summary.txt gets one line per round, WORKDIR/leftover.txt any kvmgate or QEMU process
# still alive after a round (there should be none).  Exit status 0 when every round of both
# copies passed.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
COMMIT=${1:-HEAD}; ROUNDS=${2:-5}; WORK=${3:-/tmp/kvmgate-stress}
COMMIT=$(git -C "$REPO" rev-parse "$COMMIT") || exit 2
mkdir -p "$WORK" && cd "$WORK" || exit 2
rm -f summary.txt leftover.txt round*.txt
if [ "$(id -u)" = 0 ]; then                       # the libvirt tests need the daemons
  for d in virtlogd libvirtd; do pf=/run/$d.pid
    command -v "$d" >/dev/null || continue
    if ! { [ -s "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null; }; then "$d" -d -p "$pf"; fi
  done
fi
for c in a b; do
  rm -rf "$c"
  git clone -q "$REPO" "$c" && git -C "$c" checkout -q "$COMMIT" &&
    (cd "$c" && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[test]') ||
    { echo "setting up copy $c failed"; exit 2; }
done
export KVMGATE_REQUIRE_KVM=1 KVMGATE_REQUIRE_QEMU=1 KVMGATE_REQUIRE_LIBVIRT=1   # as .ci/run
ulimit -c unlimited
failed=0
for r in $(seq 1 "$ROUNDS"); do
  for c in a b; do
    (cd "$c" && . .venv/bin/activate &&
       python -m pytest -q -p no:cacheprovider --durations=10 > "../round$r.$c.txt" 2>&1
     echo "rc=$?" >> "../round$r.$c.txt") &
  done
  wait
  line="round $r $(date +%T):"
  for c in a b; do
    line="$line $c: $(grep -E '(passed|failed|error)' "round$r.$c.txt" | tail -1) $(tail -1 "round$r.$c.txt") |"
    grep -q '^rc=0$' "round$r.$c.txt" || failed=1
  done
  echo "$line" | tee -a summary.txt
  ps -eo pid,ppid,etime,cmd | grep -E "[k]vmgate |[q]emu-system" | grep -v "tools/stress.sh" >> leftover.txt
done
[ -s leftover.txt ] && { echo "processes left behind: see $WORK/leftover.txt"; failed=1; }
exit $failed
