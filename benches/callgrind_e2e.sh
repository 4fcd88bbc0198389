#!/usr/bin/env bash
# Client-thread instructions per request for `e2e` stacks, counted by
# `valgrind --tool=callgrind` (a count, not a time: the same on a loaded
# machine, where the CPU-time figures of `e2e` swing).
#
#   benches/callgrind_e2e.sh get_c32 bare tower_retry_bearer ours ours_json
#
# Only the client's thread is counted (the server runs on its own thread).
# Each stack is profiled for 2 s and for 6 s: per request = (difference of
# the thread's instructions) / (difference of the requests sent, counted as
# calls of `e2e::request`), so the stack's set-up cancels out; the other
# stacks are not built at all (`E2E_ONLY`).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

case_name=$1
shift
cargo bench --bench e2e --no-run 2>/dev/null
bin=$(ls -t target/release/deps/e2e-* | grep -v '\.d$' | head -n 1)
out=target/callgrind-e2e
mkdir -p "$out"

for stack in "$@"; do
    for seconds in 2 6; do
        name="${stack}_${case_name}.$seconds"
        rm -f "$out/$name".out*
        E2E_ONLY="$stack/$case_name" valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/$name.out" \
            "$bin" --bench --profile-time "$seconds" "e2e_cpu/$stack/$case_name\$" >"$out/$name.log" 2>&1
    done
done

PYTHONPATH=benches python3 - "$out" "$case_name" "$@" <<'PY'
import glob, sys

from callgrind_calls import calls_of, total_instructions

out, case, stacks = sys.argv[1], sys.argv[2], sys.argv[3:]

def main_thread(prefix):
    # Thread 1 is the bench's main thread: the client and its runtime.
    files = sorted(glob.glob(f"{prefix}.out-01")) or sorted(glob.glob(f"{prefix}.out*"))
    return files[0]

def totals_and_requests(path):
    return total_instructions(path), calls_of(path, "e2e::request")

per = {}
for stack in stacks:
    short = totals_and_requests(main_thread(f"{out}/{stack}_{case}.2"))
    long = totals_and_requests(main_thread(f"{out}/{stack}_{case}.6"))
    requests = long[1] - short[1]
    per[stack] = (long[0] - short[0]) / requests if requests > 0 else float("nan")
    print(f"{stack}/{case}: {per[stack]:.0f} client-thread instructions per request ({requests} requests)")
if "bare" in per:
    print()
    for stack in stacks:
        if stack != "bare":
            print(f"{stack}/{case}: overhead over bare {per[stack] - per['bare']:+.0f} instructions per request")
PY
