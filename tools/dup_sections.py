#!/usr/bin/env python3
"""Repeated code per section of moe_infer.h, for structure work.

Splits the header at its `// [SECTION]` banners into one file per section in a temporary folder,
runs the `duplicates` tool there, and counts the repeated runs of lines by section pair.

    python3 tools/dup_sections.py [HEADER] [--min-lines N]
    git show REV:moe_infer.h > /tmp/old.h && python3 tools/dup_sections.py /tmp/old.h   # compare
"""
import collections
import os
import re
import subprocess
import sys
import tempfile


def main():
    args = sys.argv[1:]
    min_lines = "6"
    if "--min-lines" in args:
        i = args.index("--min-lines")
        min_lines = args[i + 1]
        del args[i:i + 2]
    header = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "moe_infer.h")
    text = open(header, encoding="utf-8").read().split("\n")
    with tempfile.TemporaryDirectory() as tmp:
        name, start, count = "00_preamble", 0, 0
        for i, line in enumerate(text + ["// [SECTION] END"]):
            m = re.match(r"// \[SECTION\] (.*)", line)
            if not m:
                continue
            with open(os.path.join(tmp, name + ".h"), "w", encoding="utf-8") as f:
                f.write("\n".join(text[start:i]) + "\n")
            count += 1
            name = "%02d_%s" % (count, re.sub(r"[^a-z0-9]+", "_", m.group(1).lower()).strip("_"))
            start = i
        out = subprocess.run(["duplicates", "--repo", tmp, "--most", "200", "--min-lines", min_lines, "--seconds", "120"],
                             capture_output=True, text=True).stdout
    pairs = collections.Counter()
    for line in out.splitlines():
        files = re.findall(r"(\d\d_[a-z0-9_]+)\.h", line)
        if len(files) >= 2:
            more = re.search(r"\(\+(\d+) more runs?\)", line)
            pairs[" ~ ".join(sorted(files[:2]))] += 1 + (int(more.group(1)) if more else 0)
    for pair, n in sorted(pairs.items(), key=lambda kv: -kv[1]):
        print("%3d  %s" % (n, pair))
    print("%3d  runs in all (min %s lines)" % (sum(pairs.values()), min_lines))


if __name__ == "__main__":
    main()
