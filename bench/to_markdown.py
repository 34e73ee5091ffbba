"""Turn a ``bnrewrite bench --out`` JSON file into the markdown section of BENCHMARKS.md.

python bench/to_markdown.py results.json >> BENCHMARKS.md   (then edit the prose)
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _t(entry: dict[str, Any] | None) -> float | None:
    if not entry or "error" in entry:
        return None
    return entry.get("graph_ms", entry.get("ms"))


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def to_markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        f"## {meta['date']} — {meta['device']} ({meta['mode']} mode)",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; "
        f"{meta['dtype']}, layout {meta['layout']}, batch {meta['batch']}; "
        f"timing: {meta['timing']}; elapsed {meta.get('elapsed_s')} s.",
    ]
    bw = meta.get("copy_bw_measured")
    if bw:
        lines.append(f"Measured copy bandwidth: {bw / 1e12:.2f} TB/s (roofline uses 4.2 TB/s).")
    checks = data.get("checks") or []
    if checks:
        ok = sum(c["ok"] for c in checks)
        lines.append(f"Kernel checks against the torch estimator: {ok}/{len(checks)} ok.")
    lines.append("")
    rows = data.get("layers") or []
    names: list[str] = []
    for row in rows:
        for name in row.get("times", {}):
            if name not in names:
                names.append(name)
    if rows:
        lines.append("Forward + backward per BN layer, ms (CUDA-graph median where it captured):")
        lines.append("")
        head = ["shape", "5-pass roofline"] + names
        kern = [n for n in names if n.startswith("kernels")]
        head += [f"{n}: % roofline / vs cuDNN / vs compile BN" for n in kern]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + " --- |" * len(head))
        for row in rows:
            cells = ["×".join(str(s) for s in row["shape"]), _fmt(row["roofline_5pass_ms"])]
            cells += [_fmt(_t(row["times"].get(n))) for n in names]
            for n in kern:
                r = row.get("ratios", {}).get(n, {})
                cells.append(
                    f"{_fmt(r.get('pct_roofline'), 0)}% / {_fmt(r.get('speedup_vs_cudnn'), 2)}× / "
                    f"{_fmt(r.get('speedup_vs_compile_bn'), 2)}×"
                )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    e2e = data.get("e2e")
    if e2e and e2e.get("variants"):
        lines.append(
            f"ResNet-50 training step ({e2e['model']}, batch {e2e['batch']}, {e2e['dtype']}, "
            f"compile={e2e['compile']}, median of {e2e['steps']} steps):"
        )
        lines.append("")
        lines.append("| variant | ms/step | vs plain | first step (s) |")
        lines.append("| --- | --- | --- | --- |")
        for name, v in e2e["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | error: {v['error'][:120]} | | |")
                continue
            sp = v.get("speedup_vs_plain")
            lines.append(
                f"| {name} | {v['step_ms']:.2f} | {_fmt(sp, 3)}× | {v.get('first_step_s', '')} |"
            )
        lines.append("")
    bd = [b for b in data.get("breakdown") or [] if "error" not in b]
    if bd:
        lines.append(
            "Kernels, forward and backward apart (ms; roofline at (2+f) and (3+3f) passes):"
        )
        lines.append("")
        lines.append("| shape | method | forward | roofline | backward | roofline | offsets |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for b in bd:
            lines.append(
                f"| {'×'.join(map(str, b['shape']))} | {b['method']} | {_fmt(_t(b['forward']))} | "
                f"{_fmt(b['roofline_fwd_ms'])} | {_fmt(_t(b['backward']))} | "
                f"{_fmt(b['roofline_bwd_ms'])} | {_fmt(_t(b['draw_offsets']))} |"
            )
        lines.append("")
    tune = [t for t in data.get("tuning") or [] if _t(t)]
    if tune:
        lines.append("Tuning (kernels, first method; ms):")
        lines.append("")
        lines.append("| shape | config | ms |")
        lines.append("| --- | --- | --- |")
        for t in tune:
            shape = "×".join(map(str, t["shape"]))
            lines.append(f"| {shape} | {t['config'] or 'default'} | {_fmt(_t(t))} |")
        lines.append("")
    eager = data.get("eager") or []
    if eager:
        names = [k for k in eager[0]["times_ms"] if k != "native"]
        lines.append(
            "Eager rows (one BN layer, forward + backward without torch.compile; median ms, "
            "time / native BN in parentheses):"
        )
        lines.append("")
        lines.append("| shape | native | " + " | ".join(names) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in names) + " |")
        for row in eager:
            shape = "×".join(map(str, row["shape"]))
            t, r = row["times_ms"], row["ratio_vs_native"]
            cells = [f"{t[n]:.3f} ({r[n]:.2f}×)" for n in names]
            lines.append(f"| {shape} | {t['native']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    if data.get("errors"):
        lines.append("Errors: " + "; ".join(data["errors"]) + ".")
        lines.append("")
    targets = data.get("targets") or {}
    if targets:
        met = [k for k, v in targets.items() if all(v.values())]
        lines.append(f"Issue-8 targets met: {len(met)}/{len(targets)}.")
        missed = [
            f"{k} ({', '.join(t for t, ok in v.items() if not ok)})"
            for k, v in targets.items()
            if k not in met
        ]
        if missed:
            lines.append("Missed: " + "; ".join(missed) + ".")
        lines.append("")
    if data.get("skipped"):
        lines.append("Skipped (time budget or errors): " + "; ".join(data["skipped"]) + ".")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(to_markdown(json.load(f)))
