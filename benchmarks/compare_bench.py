"""Compare the bench JSONs of benchmarks/before_after.sh: per kernel and shape, the medians of every
before and after round, the spread of each side (max - min over its rounds) and the change of the
after side's best round against the before side's best, with a verdict: "slower" only when the
after side is slower by more than the larger of the two spreads."""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def rows(folder: Path) -> dict[tuple[str, str], float]:
    """(kernel, shape) -> ms over every bench JSON below `folder`."""
    found = {}
    for path in sorted(folder.rglob("bench-*.json")):
        for r in json.loads(path.read_text())["results"]:
            shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items() if isinstance(v, int))
            found[(r["kernel"], shape)] = r["ms"]
    return found


def main(out: Path) -> None:
    sides: dict[str, list[dict]] = defaultdict(list)
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        side = folder.name.split("-")[0]
        if side in ("before", "after"):
            sides[side].append(rows(folder))
    keys = sorted(set().union(*sides["before"], *sides["after"]))
    print("| kernel | shape | before ms (rounds) | after ms (rounds) | spread ms | after / before | verdict |")
    print("|---|---|---|---|---|---|---|")
    for key in keys:
        b = [r[key] for r in sides["before"] if key in r]
        a = [r[key] for r in sides["after"] if key in r]
        if not a or not b:
            print(f"| {key[0]} | {key[1]} | {b} | {a} | - | - | missing |")
            continue
        spread = max(max(b) - min(b), max(a) - min(a))
        ratio = min(a) / min(b)
        verdict = "slower" if min(a) - min(b) > spread else ("faster" if min(b) - min(a) > spread else "same")
        fmt = lambda xs: " / ".join(f"{x:.4f}" for x in xs)  # noqa: E731
        print(f"| {key[0]} | {key[1]} | {fmt(b)} | {fmt(a)} | {spread:.4f} | {ratio:.3f} | {verdict} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
