#!/usr/bin/env bash
# Instructions per request for `hot_path` variants, counted by
# `valgrind --tool=callgrind` (a count, not a time: the same on a loaded
# machine). Also prints where the instructions of the first variant go,
# function by function, against the second.
#
#   benches/callgrind.sh tower_retry_bearer ours/replay_on_empty_body
#   benches/callgrind.sh ours/replay_on_empty_body ours/detector_json_rule
#
# Each variant is profiled twice, for 1 s and for 3 s: per request =
# (difference of the instructions inside `hot_path::send`) / (difference of
# its calls), so whatever is counted once (set-up, first-call
# initialisation) cancels out. For each variant it also lists the crate's
# own functions with their inclusive cost per request (`AuthRefresh::call`
# is the first attempt up to the inner service's return; the response
# future's drop is the clean-up after the answer).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

cargo bench --bench hot_path --no-run 2>/dev/null
bin=$(ls -t target/release/deps/hot_path-* | grep -v '\.d$' | head -n 1)
out=target/callgrind
mkdir -p "$out"

for variant in "$@"; do
    for seconds in 1 3; do
        name=${variant//\//_}.$seconds
        valgrind --tool=callgrind --callgrind-out-file="$out/$name.out" \
            "$bin" --bench --profile-time "$seconds" "hot_path/$variant\$" >"$out/$name.log" 2>&1
        callgrind_annotate --inclusive=yes "$out/$name.out" >"$out/$name.inclusive" 2>/dev/null
        callgrind_annotate --threshold=100 "$out/$name.out" >"$out/$name.self" 2>/dev/null
    done
done

PYTHONPATH=benches python3 - "$out" "$@" <<'PY'
import re, sys

from callgrind_calls import calls_of

out, variants = sys.argv[1], sys.argv[2:]

def calls_of_send(path):
    return calls_of(path, "hot_path::send")

def table(path, per):
    rows = {}
    for line in open(path):
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)(?: \[.*)?$", line)
        if m:
            rows[m.group(2)] = int(m.group(1).replace(",", "")) / per
    return rows

def inclusive_of_send(path):
    for line in open(path):
        if re.search(r"\?\?\?:hot_path::send \[", line):
            return int(line.split()[0].replace(",", ""))
    return 0

per_request, self_costs = {}, {}
for v in variants:
    name = v.replace("/", "_")
    short, long = f"{out}/{name}.1", f"{out}/{name}.3"
    calls = calls_of_send(f"{long}.out") - calls_of_send(f"{short}.out")
    inclusive = inclusive_of_send(f"{long}.inclusive") - inclusive_of_send(f"{short}.inclusive")
    per_request[v] = inclusive / calls if calls > 0 else float("nan")
    short_self, long_self = table(f"{short}.self", 1), table(f"{long}.self", 1)
    self_costs[v] = {k: (long_self[k] - short_self.get(k, 0)) / max(calls, 1) for k in long_self}
    print(f"{v}: {per_request[v]:.0f} instructions per request ({calls} requests)")

def crate_functions(path):
    """Inclusive cost of the crate's own functions."""
    rows = {}
    for line in open(path):
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\?\?\?:(.*?) \[", line)
        if m and "tower_auth_refresh::" in m.group(2):
            rows[m.group(2)] = int(m.group(1).replace(",", ""))
    return rows

for v in variants:
    name = v.replace("/", "_")
    short, long = f"{out}/{name}.1", f"{out}/{name}.3"
    calls = max(calls_of_send(f"{long}.out") - calls_of_send(f"{short}.out"), 1)
    short_fns, long_fns = crate_functions(f"{short}.inclusive"), crate_functions(f"{long}.inclusive")
    rows = sorted(((cost - short_fns.get(fn, 0)) / calls, fn) for fn, cost in long_fns.items())
    print(f"\n{v}: the crate's functions, inclusive instructions per request (largest first):")
    for cost, fn in reversed(rows[-12:]):
        print(f"{cost:8.0f}  {fn[:140]}")

if len(variants) >= 2:
    a, b = variants[0], variants[1]
    print(f"\n{b} - {a}: {per_request[b] - per_request[a]:+.0f} per request; largest differences by function (self cost per request):")
    keys = set(self_costs[a]) | set(self_costs[b])
    diff = sorted(keys, key=lambda k: -abs(self_costs[b].get(k, 0) - self_costs[a].get(k, 0)))
    for k in diff[:25]:
        x, y = self_costs[a].get(k, 0), self_costs[b].get(k, 0)
        if k != "PROGRAM TOTALS":
            print(f"{y - x:+8.0f}  {k[:140]}")
PY
