"""Median over several ``bnrewrite bench --sections compiled --out F.json`` runs: Markdown tables
of the layer rows (Inductor's passes, the same under Triton's fusion rules, kernels, and time /
compiled BN with the range over runs) and of the ResNet-50 step (speed-up over compiled BN).

    python bench/compiled_summary.py run1.json run2.json run3.json
"""

from __future__ import annotations

import json
import statistics
import sys


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    meta = runs[0]["meta"]
    layers = [r["compiled"]["layers"] for r in runs]
    names = list(next(row for row in layers[0] if "variants" in row)["variants"])
    base = names[0]
    print(
        f"{len(runs)} runs, {meta['device']}, torch {meta['torch']}, {meta['dtype']}; passes = "
        "Inductor's bytes / activation bytes, C++ backend [Triton's plan]; k = kernels; time cell "
        f"= median over runs of (median time / {base}), [min-max over runs]; {base} in ms"
    )
    print()
    print(f"| shape | layout | {base} ms | " + " | ".join(names[1:]) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in names[1:]) + " |")
    for i, row in enumerate(layers[0]):
        shape = "x".join(map(str, row["shape"]))
        rows = [r[i] for r in layers if "variants" in r[i]]
        if not rows:
            print(f"| {shape} | {row['layout']} | skipped |")
            continue
        v0 = rows[0]["variants"]

        def plan(name: str, v0: dict = v0) -> str:
            t = v0[name].get("passes_triton_plan")
            return "" if t is None else f" [{t:.2f}]"

        head = f"{statistics.median(r['variants'][base]['ms'] for r in rows):.2f}"
        head += f" ({v0[base]['passes']:.2f}p{plan(base)}, {v0[base]['kernels']}k)"
        cells = [
            _cell([r["variants"][n]["ratio"] for r in rows])
            + f" ({v0[n]['passes']:.2f}p{plan(n)}, {v0[n]['kernels']}k)"
            for n in names[1:]
        ]
        print(f"| {shape} | {row['layout']} | {head} | " + " | ".join(cells) + " |")
    models = [r["compiled"]["model"] for r in runs if r["compiled"].get("model")]
    if not models:
        return
    m0 = models[0]
    print()
    print(
        f"ResNet-50 SGD step, batch {m0['batch']}, {m0['size']}x{m0['size']}, channels-last: "
        "median ms over runs and speed-up = compiled BN's time / the variant's, [min-max]"
    )
    print()
    print("| variant | ms | speed-up |")
    print("| --- | --- | --- |")
    for name in m0["variants"]:
        ms = statistics.median(m["variants"][name]["ms"] for m in models)
        print(f"| {name} | {ms:.1f} | {_cell([m['variants'][name]['speedup'] for m in models])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
