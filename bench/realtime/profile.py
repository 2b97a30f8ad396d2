"""Sum py-spy's collapsed stacks (``run.py --profile DIR``): where the node's busy time went.

    python profile.py DIR/b-this-0-1000.txt [--top 30] [--match forge_realtime]

Prints the functions with the most samples on top of the stack (self) and the most samples
anywhere in the stack (inclusive), as shares of the samples in which the node was busy.
"""

from __future__ import annotations

import argparse
import collections
import re

_LINE = re.compile(r"^(.*) (\d+)$")


def frames(stack: str) -> list[str]:
    out = []
    for f in stack.split(";"):
        # "name (path/to/file.py:123)" -> "name (file.py)": one entry per function, not per line
        m = re.match(r"^(.*?) \((?:.*/)?([^/:]+)(?::\d+)?\)$", f)
        out.append(f"{m.group(1)} ({m.group(2)})" if m else f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--match", default="", help="inclusive list: only functions whose name contains this")
    a = ap.parse_args()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for path in a.files:
        for line in open(path):
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            n = int(m.group(2))
            fs = frames(m.group(1))
            total += n
            own[fs[-1]] += n
            for f in set(fs):
                incl[f] += n
    print(f"{total} busy samples")
    print("self:")
    for f, n in own.most_common(a.top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("inclusive:")
    shown = 0
    for f, n in incl.most_common():
        if a.match and a.match not in f:
            continue
        print(f"  {100 * n / total:5.1f}%  {f}")
        shown += 1
        if shown >= a.top:
            break


if __name__ == "__main__":
    main()
