"""Reading callgrind output files, shared by benches/callgrind.sh and
benches/callgrind_e2e.sh."""

import re


def calls_of(path, function):
    """How many times functions whose name ends with `function` were called
    in the callgrind output file `path`."""
    names, current, calls = {}, None, 0
    for line in open(path, errors="replace"):
        m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2)
            if line.startswith("cfn="):
                current = names.get(m.group(1))
            continue
        m = re.match(r"calls=(\d+)", line)
        if m and current and current.endswith(function):
            calls += int(m.group(1))
    return calls


def total_instructions(path):
    """All instructions counted in the callgrind output file `path`."""
    for line in open(path, errors="replace"):
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    return 0
