#!/usr/bin/env bash
# Runs every bench with short settings and writes BENCHMARKS.md: medians,
# each with its baseline from the same run, and the ratios between them.
#
#   benches/report.sh            # all benches (about 15 minutes on 2 cores)
#   benches/report.sh hot_path   # one bench; the report keeps the others' last run
set -euo pipefail
cd "$(dirname "$0")/.."

benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then
    benches=(e2e hot_path contention stampede replay detect)
fi

mkdir -p target/bench-logs
for bench in "${benches[@]}"; do
    echo "== bench $bench"
    cargo bench --bench "$bench" -- --warm-up-time 1 --measurement-time 2 --noplot \
        | tee "target/bench-logs/$bench.log"
done

python3 - <<'PY'
import json, os, platform, re, subprocess, datetime

root = "target/criterion"

def median(group, name):
    path = os.path.join(root, group, name, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except FileNotFoundError:
        return None

def fmt(ns):
    if ns is None:
        return "n/a"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"

def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}×"

def cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"

rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
out = []
w = out.append
w("# Benchmarks\n")
w(f"Machine: {cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; {rustc}; "
  f"run {datetime.date.today().isoformat()} with `benches/report.sh` "
  "(criterion, 1 s warm-up, 2 s measurement). Figures are medians; every ratio compares two "
  "figures from the same run. The machine is shared and noisy: read ratios, not absolute times.\n")

# end to end
w("## End to end: a real hyper-util client and hyper server on loopback\n")
w("Client on one thread, server on another, 900-byte token. *CPU* is the client thread's CPU time "
  "per request (thread CPU time, not wall); *overhead* is that minus `bare`'s; *throughput* is "
  "bare's wall time per request over the stack's. All from the same run. `middle` and `aliri_tokens` "
  "attach a header their library keeps fresh in the background (no expiry detection, no replay): "
  "what attaching alone costs.\n")
w("| stack | case | client CPU / req | overhead | throughput / bare |")
w("|---|---|---|---|---|")
cases = ["get_c1", "get_c32", "post4k_c1", "post4k_c32"]
stacks = ["bare", "tower_http_bearer", "tower_retry_bearer", "middle", "aliri_tokens", "ours", "ours_json",
          "tenants_1", "tenants_1000"]
cpu_of = {}
for st in stacks:
    for cs in cases:
        cpu_ = median("e2e_cpu", f"{st}/{cs}")
        wall = median("e2e_wall", f"{st}/{cs}")
        if cpu_ is None:
            continue
        cpu_of[(st, cs)] = cpu_
        bare_cpu = median("e2e_cpu", f"bare/{cs}")
        bare_wall = median("e2e_wall", f"bare/{cs}")
        over = "n/a" if bare_cpu is None else f"{(cpu_ - bare_cpu) / 1e3:+.2f} µs"
        w(f"| {st} | {cs} | {fmt(cpu_)} | {over} | {ratio(bare_wall, wall)} |")
def over(st, cs):
    a, b = cpu_of.get((st, cs)), cpu_of.get(("bare", cs))
    return None if a is None or b is None else a - b
w("")
for cs in cases:
    o, r = over("ours", cs), over("tower_retry_bearer", cs)
    if o is None or r is None:
        continue
    # A difference of two noisy figures: at or below zero, the ratio means nothing.
    q = f"**{o / r:.2f}×**" if r > 0 else "n/a (Retry's overhead ≤ 0 in this run: noise)"
    w(f"- {cs}: ours' overhead / tower Retry + AddAuthorization overhead: {q} (target ≤ 1)")
for cs in cases:
    a, b = median("e2e_wall", f"ours/{cs}"), median("e2e_wall", f"bare/{cs}")
    if a and b:
        w(f"- {cs}: ours' throughput / bare's: **{b / a:.2f}×** (target ≥ 0.97×)")
j, o = over("ours_json", "get_c32"), over("ours", "get_c32")
if j is not None and o is not None:
    q = f"**{j / o:.2f}×**" if o > 0 else "n/a (the default detector's overhead ≤ 0 in this run: noise)"
    w(f"- get_c32: JSON rule overhead / default detector overhead: {q} (target ≤ 1.5×)")
t1, t1000 = cpu_of.get(("tenants_1", "get_c32")), cpu_of.get(("tenants_1000", "get_c32"))
if t1 and t1000:
    w(f"- get_c32: 1,000 tenants / 1 tenant, client CPU per request: **{t1000 / t1:.2f}×** (target ≤ 1.1×)")
w("")

# hot path
g = "hot_path"
floor = median(g, "tower_http_bearer")
w("## Hot path: one request, valid token, no-op inner service\n")
w("| variant | median | / tower-http floor |")
w("|---|---|---|")
rows = ["bare", "tower_http_bearer", "tower_retry_bearer", "ours/replay_off", "ours/replay_on_empty_body",
        "tower_http_bearer_1kib_body", "ours/replay_on_1kib_body", "ours/detector_json_rule",
        "mutex_layer", "rwlock_layer", "middle", "aliri_tokens"]
for r in rows:
    m = median(g, r.replace("/", "_"))
    if m is None:
        m = median(g, r)
    w(f"| {r} | {fmt(m)} | {ratio(m, floor)} |")
ours = median(g, "ours_replay_on_empty_body") or median(g, "ours/replay_on_empty_body")
w("")
w(f"- ours (replay on, empty body) / floor: **{ratio(ours, floor)}** (target ≤ 1.25×)")
w(f"- ours (replay on, empty body) / tower Retry + AddAuthorization: **{ratio(ours, median(g, 'tower_retry_bearer'))}** (target ≤ 1)")
kib_ours = median(g, "ours_replay_on_1kib_body")
kib_floor = median(g, "tower_http_bearer_1kib_body")
w(f"- ours with a 1 KiB body / floor with the same body: **{ratio(kib_ours, kib_floor)}**")
for peer in ["middle", "aliri_tokens", "mutex_layer", "rwlock_layer"]:
    w(f"- ours / {peer}: **{ratio(ours, median(g, peer))}** (target ≤ 0.5× for peers)")
w("")

# contention
g = "contention_threads"
w("## Contention: the token read alone (ns per read per thread)\n")
w("Each thread does the full iteration count at once; a flat row means reads scale. "
  "Scaling = (threads × 1-thread time) / (N-thread time) is the throughput gained over one thread.\n")
w("| cell | 1 thread | 2 threads | 4 threads | 8 threads | 2-thread scaling |")
w("|---|---|---|---|---|---|")
for cell in ["arc_swap_ours", "std_rwlock", "std_mutex", "tokio_rwlock", "tokio_watch"]:
    vals = [median(g, f"{cell}/{t}") for t in (1, 2, 4, 8)]
    scale = "n/a" if None in vals[:2] else f"{2 * vals[0] / vals[1]:.2f}×"
    w(f"| {cell} | " + " | ".join(fmt(v) for v in vals) + f" | {scale} |")
w("")
g = "contention_tasks"
w("| cell | 64 tasks | 1,024 tasks |")
w("|---|---|---|")
for cell in ["arc_swap_ours", "std_rwlock", "std_mutex", "tokio_rwlock", "tokio_watch"]:
    w(f"| {cell} | {fmt(median(g, f'{cell}/64'))} | {fmt(median(g, f'{cell}/1024'))} |")
w("")
g = "contention_layer"
w("The whole layer (one shared token, a no-op inner service) on 1 and 2 threads, against tower-http's "
  "static header on the same threads (ns per request per thread):\n")
w("| variant | 1 thread | 2 threads | 2-thread scaling |")
w("|---|---|---|---|")
for v in ["ours", "tower_http_bearer"]:
    one, two = median(g, f"{v}/1"), median(g, f"{v}/2")
    scale = "n/a" if None in (one, two) else f"{2 * one / two:.2f}×"
    w(f"| {v} | {fmt(one)} | {fmt(two)} | {scale} |")
w("")
g = "contention_refcount"
w("Cost of the header's shared reference count (ns per insert per thread):\n")
w("| variant | 1 thread | 2 threads |")
w("|---|---|---|")
for v in ["clone_shared_bytes", "clone_per_thread_copy", "copy_short_header", "static_header"]:
    w(f"| {v} | {fmt(median(g, f'{v}/1'))} | {fmt(median(g, f'{v}/2'))} |")
w("")

# stampede
g = "stampede"
calls = {}
try:
    for line in open("target/bench-logs/stampede.log"):
        m = re.match(r"stampede calls: (\S+) n=(\d+) token_source_calls=(\d+)", line)
        if m:
            calls[(m[1], int(m[2]))] = int(m[3])
except FileNotFoundError:
    pass
w("## Stampede: N requests on an expired token, 5 ms token source\n")
w("| N | ours: calls | ours: wall | aws-smithy ExpiringCache: calls | wall | naive mutex: calls | wall | ours / smithy |")
w("|---|---|---|---|---|---|---|---|")
for n in [10, 100, 1000, 10000]:
    o, s, nv = (median(g, f"{k}/{n}") for k in ["ours", "aws_smithy_expiring_cache", "naive_mutex"])
    w(f"| {n} | {calls.get(('ours', n), 'n/a')} | {fmt(o)} | {calls.get(('aws_smithy_expiring_cache', n), 'n/a')} | {fmt(s)} "
      f"| {calls.get(('naive_mutex', n), 'n/a')} | {fmt(nv)} | {ratio(o, s)} |")
w("\nThe naive baseline makes N serialised 5 ms calls, so it is measured up to N = 100 only.\n")

# replay
w("## Replay: request bodies streamed in 8 KiB chunks\n")
w("| body | figure | no replay | ours (tee) | collect then send | tee / no replay | collect / no replay |")
w("|---|---|---|---|---|---|---|")
for size in ["1KiB", "64KiB", "1MiB"]:
    for fig in ["first_byte", "total"]:
        g = f"replay_{fig}"
        a, t, c = (median(g, f"{k}/{size}") for k in ["no_replay", "ours_tee", "collect_then_send"])
        w(f"| {size} | {fig} | {fmt(a)} | {fmt(t)} | {fmt(c)} | {ratio(t, a)} | {ratio(c, a)} |")
w("\nTarget: time to first byte with the tee ≤ 1.05× no replay.\n")

# detect
g = "detect"
w("## Detect: classifying a 200 JSON response\n")
w("| body | status only | code rule | code + keywords | code+keywords / status |")
w("|---|---|---|---|---|")
for size in ["100B", "60KiB"]:
    s, c_, k = (median(g, f"{d}/{size}") for d in ["status_only", "code_rule", "code_and_keywords"])
    w(f"| {size} | {fmt(s)} | {fmt(c_)} | {fmt(k)} | {ratio(k, s)} |")
w("")

notes = "benches/NOTES.md"
if os.path.exists(notes):
    w(open(notes).read())

with open("BENCHMARKS.md", "w") as f:
    f.write("\n".join(out) + "\n")
print("wrote BENCHMARKS.md")
PY
