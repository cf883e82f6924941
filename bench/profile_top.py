"""Summarise a py-spy ``raw`` (collapsed stacks) profile: top functions by self and total time.

python bench/profile_top.py bench/.run/profiles/<run>.collapsed.txt [--top 30] [--grep X]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--grep", default="")
    a = ap.parse_args()
    self_t: Counter[str] = Counter()
    total_t: Counter[str] = Counter()
    n = 0
    for line in a.path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or (a.grep and a.grep not in stack):
            continue
        c = int(count)
        n += c
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")") for f in stack.split(";")]
        self_t[frames[-1]] += c
        for f in set(frames):
            total_t[f] += c
    print(f"{n} samples")
    print("-- self --")
    for f, c in self_t.most_common(a.top):
        print(f"{c / n:6.1%}  {f}")
    print("-- total --")
    for f, c in total_t.most_common(a.top):
        print(f"{c / n:6.1%}  {f}")


if __name__ == "__main__":
    main()
