"""Median over several ``bnrewrite bench --sections eager --out F.json`` runs: one Markdown table of
time / native BN per shape and variant, with the range over runs (a shared machine is noisy).

    python bench/eager_summary.py run1.json run2.json run3.json
"""

from __future__ import annotations

import json
import statistics
import sys


def main(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    rows = [r["eager"] for r in runs]
    names = [k for k in rows[0][0]["times_ms"] if k != "native"]
    meta = runs[0]["meta"]
    print(
        f"{len(runs)} runs, {meta['device']}, torch {meta['torch']}, {meta['dtype']}, "
        f"layout {meta['layout']}; cell = median over runs of (median time / native BN time), "
        f"[min-max over runs]; native column in ms"
    )
    print("| shape | native ms | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for i, row in enumerate(rows[0]):
        shape = "x".join(map(str, row["shape"]))
        native = statistics.median(r[i]["times_ms"]["native"] for r in rows)
        cells = []
        for name in names:
            ratios = [r[i]["ratio_vs_native"][name] for r in rows]
            cells.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        print(f"| {shape} | {native:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
