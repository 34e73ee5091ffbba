"""``bnrewrite bench``: BatchNorm lowerings against each other and against the memory roofline.

On a CUDA GPU (default shapes: every distinct BN input of ResNet-50 at batch 256, bf16,
channels-last, forward + backward):

* per BN shape: cuDNN (eager ``F.batch_norm``), ``torch.compile`` of BN, the sampled layer through
  the fused Triton kernels (:mod:`bnrewrite.kernels`) for each ``--methods`` entry, and the
  compiled pure-torch sampled form; medians from ``triton.testing.do_bench`` (``ms``, includes
  CPU launch overhead when it dominates) and ``do_bench_cudagraph`` (``graph_ms``, GPU time);
  ratios and the share of the 5-pass roofline ``5 * bytes / 4.2e12 s`` (ANCHORS.md);
* the ResNet-50 training step (batch 256, bf16 autocast, channels-last, SGD) under
  ``torch.compile`` with plain BN, with ``backend="bnrewrite"`` and ``lowering="kernels"`` (the
  kernels with ReLU / residual-add + ReLU epilogues fused by the FX pass), with the module route
  (``convert_fused_`` + ``fuse_relu``), and -- budget permitting -- the fused BN without
  epilogues, the backend with the torch lowering and the compiled torch estimator.

A time budget (``--budget-s``) keeps the whole run under 5 minutes on an H200: sections that would
not fit are recorded as skipped. On the CPU (or with ``--small``) it runs small shapes in seconds,
which is what CI tests. ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HELP = "benchmark BN lowerings (layer table vs roofline, ResNet-50 step); --out writes JSON"

__all__ = ["HELP", "add_arguments", "run", "ROOFLINE_BW", "roofline_ms"]

#: Copy bandwidth of one H200 measured for ANCHORS.md (bytes/s).
ROOFLINE_BW = 4.2e12
#: ANCHORS.md's three measured shapes (and the smallest ResNet-50 BN input).
ANCHOR_SHAPES = [(64, 112, 112), (256, 56, 56), (1024, 14, 14), (2048, 7, 7)]
SMALL_SHAPES = [(8, 16, 16), (32, 8, 8), (64, 4, 4)]
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def roofline_ms(numel: int, itemsize: int, passes: int = 5, bw: float = ROOFLINE_BW) -> float:
    """``passes`` full passes over ``numel`` elements at ``bw`` bytes/s, in milliseconds."""
    return passes * numel * itemsize / bw * 1e3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="write results as JSON to this file")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--small", action="store_true", help="CI-size shapes (the default on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (256 on GPU, 4 small)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="bf16 (GPU) / fp32")
    p.add_argument("--layout", choices=["cl", "nchw"], default="cl", help="channels-last or NCHW")
    p.add_argument(
        "--shapes",
        default=None,
        help="'all' (every ResNet-50 BN shape), 'anchors', or a list like 64x56x56,256x14x14",
    )
    p.add_argument("--methods", default="bs:1/8,fs:1/16", help="sampled methods, method:ratio,...")
    p.add_argument(
        "--compile",
        choices=["auto", "none", "anchors", "all"],
        default="auto",
        help="shapes that get torch.compile variants (auto: anchors on GPU, none on CPU)",
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the ResNet-50 training step")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed ResNet-50 steps")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-tune", action="store_true", help="skip the GPU block-shape tuning pass")
    p.add_argument(
        "--interpret",
        action="store_true",
        help="CPU only: run the Triton kernels under TRITON_INTERPRET=1 (slow; tiny shapes)",
    )
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting sections after")
    p.add_argument(
        "--sections",
        default=None,
        help="comma list of checks,eager,layers,e2e,breakdown,compile,e2e-extra,tune,compiled "
        "(default: all but compiled, which is its own run: the backend's lowering vs compiled BN, "
        "Inductor's byte count and times, and the ResNet-50 step)",
    )
    p.add_argument(
        "--e2e-variants",
        default=None,
        help="ResNet-50 variants instead of the defaults, e.g. 'plain,fused bs 0.125,backend+kernels "
        "bs 0.125,backend bs 0.125,torch fs 0.0625' (kinds: plain, fused, backend, "
        "backend+kernels, torch)",
    )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
class _Budget:
    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _parse_shapes(text: str | None, small: bool, batch: int) -> list[tuple[int, ...]]:
    from .resnet50 import bn_shapes

    if small:
        chw = SMALL_SHAPES if text in (None, "all", "anchors") else None
    elif text in (None, "all"):
        chw = [s[1:] for s in bn_shapes(batch)]
    elif text == "anchors":
        chw = ANCHOR_SHAPES
    else:
        chw = None
    if chw is None:
        chw = []
        for item in (text or "").split(","):
            try:
                dims = tuple(int(v) for v in item.lower().split("x"))
            except ValueError:
                dims = ()
            if not dims:
                raise ValueError(f"--shapes: expected e.g. 64x56x56,256x14x14, got {item!r}")
            chw.append(dims)
    return [(batch, *s) for s in chw]


def _parse_methods(text: str) -> list[tuple[str, str, float]]:
    from ..config import SamplingConfig, parse_ratio

    out = []
    for item in text.split(","):
        method, _, ratio = item.strip().partition(":")
        cfg = SamplingConfig(method=method, ratio=parse_ratio(ratio) if ratio else None)
        label = f"{cfg.method} {ratio}" if ratio else cfg.method
        out.append((label, cfg.method, float(cfg.ratio)))
    return out


def _median_cpu(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """``{"ms": median, "graph_ms": median under CUDA-graph replay}`` (CPU: ``ms`` only)."""
    if device != "cuda":
        return {"ms": _median_cpu(fn)}
    import torch
    import triton.testing as tt

    res: dict[str, Any] = {}
    res["ms"] = float(tt.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    try:
        res["graph_ms"] = float(tt.do_bench_cudagraph(fn, rep=30, return_mode="median"))
    except Exception as e:  # capture can fail for some variants; keep the eager number
        res["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        torch.cuda.synchronize()
    return res


def _best(entry: dict[str, Any] | None) -> float | None:
    """The GPU time of a measurement: CUDA-graph replay if it worked, else eager."""
    if not entry or "error" in entry:
        return None
    return entry.get("graph_ms", entry.get("ms"))


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# correctness checks (GPU): the kernels against the torch estimator
# ----------------------------------------------------------------------------------------------
def _checks(device: str, dtype: Any, small: bool) -> list[dict[str, Any]]:
    import torch

    from ..config import SamplingConfig
    from ..estimators import sampled_batch_norm
    from ..kernels import can_use_kernels, fused_sampled_batch_norm

    shapes = [(4, 12, 6, 6)] if small else [(32, 256, 28, 28), (16, 64, 56, 56), (64, 2048, 7, 7)]
    out = []
    for shape in shapes:
        for method, ratio, sampling in [
            ("bs", 1 / 8, "fixed"),
            ("fs", 1 / 16, "fixed"),
            ("bs", 1 / 8, "random"),
            ("fs", 1 / 16, "random"),
        ]:
            cfg = SamplingConfig(method=method, ratio=ratio, sampling=sampling)
            g = torch.Generator().manual_seed(0)
            x0 = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
            x0 = x0.to(memory_format=torch.channels_last)
            w0 = torch.rand(shape[1], generator=g).to(device) + 0.5
            b0 = torch.randn(shape[1], generator=g).to(device)
            dy = torch.randn(shape, generator=g).to(device, dtype)
            dy = dy.to(memory_format=torch.channels_last)
            res = []
            for fn in (sampled_batch_norm, fused_sampled_batch_norm):
                x = x0.clone().requires_grad_()
                w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
                rm, rv = torch.zeros_like(w0), torch.ones_like(w0)
                torch.manual_seed(1)
                y = fn(x, rm, rv, w, b, True, 0.1, 1e-5, config=cfg)
                dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
                res.append((y, dx, dw, db, rm, rv))
            errs = {}
            for name, r, o in zip(["y", "dx", "dw", "db", "rm", "rv"], *res):
                scale = r.float().abs().max().item() + 1e-6
                errs[name] = (o.float() - r.float()).abs().max().item() / scale
            tol = 2e-2 if dtype != torch.float32 else 1e-4
            out.append(
                {
                    "shape": list(shape),
                    "method": method,
                    "ratio": ratio,
                    "sampling": sampling,
                    "dtype": str(dtype).replace("torch.", ""),
                    "kernels_used": can_use_kernels(x0, cfg),
                    "max_rel_err": errs,
                    "ok": all(v <= tol for v in errs.values()),
                }
            )
    return out


# ----------------------------------------------------------------------------------------------
# layer table
# ----------------------------------------------------------------------------------------------
def _layer_variants(
    shape: tuple[int, ...],
    dtype: Any,
    device: str,
    layout: str,
    methods: list[tuple[str, str, float]],
    phase: str,
    with_kernels: bool,
) -> dict[str, Callable[[], Any]]:
    """Forward + backward closures of one BN shape.

    ``phase="base"``: cuDNN / native BN, the fused kernels, and (CPU) the eager torch estimator;
    ``phase="compile"``: ``torch.compile`` of BN and of the torch estimator (seconds per compile).
    """
    import torch
    import torch.nn.functional as F

    from ..config import SamplingConfig
    from ..estimators import sampled_batch_norm
    from ..kernels import fused_sampled_batch_norm

    C = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    if layout == "cl" and len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
        dy = dy.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)

    def step(fwd: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            y = fwd(x, w, b, rm, rv)
            return torch.autograd.grad(y, (x, w, b), dy)

        return run

    def bn(x, w, b, rm, rv):  # noqa: ANN001
        return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    variants: dict[str, Callable[[], Any]] = {}
    if phase == "base":
        variants["cudnn" if device == "cuda" else "native"] = step(bn)
    else:
        variants["compile bn"] = step(torch.compile(bn, dynamic=False))
    for label, method, ratio in methods:
        cfg = SamplingConfig(method=method, ratio=ratio)

        def sampled(x, w, b, rm, rv, cfg=cfg):  # noqa: ANN001
            return sampled_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, config=cfg)

        def fused(x, w, b, rm, rv, cfg=cfg):  # noqa: ANN001
            return fused_sampled_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, config=cfg)

        if phase == "base":
            if with_kernels:
                variants[f"kernels {label}"] = step(fused)
            if device != "cuda":
                variants[f"torch {label}"] = step(sampled)
        else:
            variants[f"compile torch {label}"] = step(torch.compile(sampled, dynamic=False))
    return variants


def _layer_table(
    args: Any, ctx: dict[str, Any], budget: _Budget, result: dict[str, Any], phase: str
) -> None:
    """Fill ``result["layers"]``: ``phase="base"`` for every shape, then ``"compile"`` for some."""
    import torch

    device, dtype, small = ctx["device"], ctx["dtype"], ctx["small"]
    methods = _parse_methods(args.methods)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if phase == "base" or not result["layers"]:
        for shape in _parse_shapes(args.shapes, small, ctx["batch"]):
            numel = math.prod(shape)
            result["layers"].append(
                {
                    "shape": list(shape),
                    "bytes": numel * itemsize,
                    "roofline_5pass_ms": roofline_ms(numel, itemsize, 5),
                    "roofline_8pass_ms": roofline_ms(numel, itemsize, 8),
                    "times": {},
                }
            )
    if phase == "base":
        rows = result["layers"]
    else:
        mode = args.compile
        if mode == "auto":
            mode = "anchors" if device == "cuda" else "none"
        if mode == "none":
            return
        anchors = {s[1:] for s in _parse_shapes("anchors", small, ctx["batch"])}
        rows = [r for r in result["layers"] if mode == "all" or tuple(r["shape"][1:]) in anchors]
    for row in rows:
        shape = tuple(row["shape"])
        # a compile takes ~5-15 s on the GPU machine; the base row takes a few seconds
        need = (15 * (1 + len(methods)) if device == "cuda" else 5) if phase == "compile" else 5
        if budget.left() < need:
            result["skipped"].append(f"layer {phase} {shape}: budget ({budget.left():.0f} s left)")
            continue
        try:
            variants = _layer_variants(
                shape, dtype, device, args.layout, methods, phase, ctx["kernels"]
            )
        except Exception as e:  # e.g. out of memory
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        for name, fn in variants.items():
            t0 = time.perf_counter()
            try:
                entry = _time(fn, device)
            except Exception as e:
                entry = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            entry["wall_s"] = round(time.perf_counter() - t0, 2)
            row["times"][name] = entry
        del variants
        _free()
        _ratios(row, methods, device)
        _print_row(row)


def _ratios(row: dict[str, Any], methods: list[tuple[str, str, float]], device: str) -> None:
    t = {k: _best(v) for k, v in row["times"].items()}
    base = t.get("cudnn" if device == "cuda" else "native")
    comp = t.get("compile bn")
    roof = row["roofline_5pass_ms"]
    ratios: dict[str, Any] = {}
    for label, _, _ in methods:
        for kind in ("kernels", "compile torch", "torch"):
            v = t.get(f"{kind} {label}")
            if not v:
                continue
            r: dict[str, Any] = {"x_roofline": v / roof, "pct_roofline": 100 * roof / v}
            if base:
                r["speedup_vs_cudnn"] = base / v
            if comp:
                r["speedup_vs_compile_bn"] = comp / v
            if kind == "kernels" and device == "cuda":
                r["target_1.25x_roofline"] = v <= 1.25 * roof
                if base:
                    r["target_1.5x_cudnn"] = base / v >= 1.5
                if comp:
                    r["target_2x_compile_bn"] = comp / v >= 2.0
            ratios[f"{kind} {label}"] = r
    for name in ("cudnn", "native", "compile bn"):
        if t.get(name):
            ratios[name] = {"x_roofline": t[name] / roof, "pct_roofline": 100 * roof / t[name]}
    row["ratios"] = ratios


def _print_row(row: dict[str, Any]) -> None:
    shape = "x".join(str(s) for s in row["shape"])
    parts = [f"{shape:>18} roof5 {row['roofline_5pass_ms']:.3f} ms |"]
    for name, entry in row["times"].items():
        v = _best(entry)
        if v is None:
            parts.append(f"{name}: error")
            continue
        pct = row["ratios"].get(name, {}).get("pct_roofline")
        parts.append(f"{name} {v:.3f}" + (f" ({pct:.0f}%)" if pct else ""))
    print("  ".join(parts), flush=True)


# ----------------------------------------------------------------------------------------------
# eager rows: the sampled layer without torch.compile (issue 12)
# ----------------------------------------------------------------------------------------------
#: (N, C, H, W) of the eager rows: the issue's three shapes, a ResNet stage-2 input, and the demo's
#: first-stage BN input (digits, batch 64, width 16).
EAGER_SHAPES = [(64, 16, 8, 8), (64, 64, 28, 28), (128, 256, 14, 14), (32, 128, 56, 56)]
EAGER_SMALL_SHAPES = [(8, 4, 6, 6), (16, 8, 4, 4)]
#: (label, method, ratio, sampling)
EAGER_METHODS = [
    ("bs 1/8", "bs", 1 / 8, "random"),
    ("fs 1/16", "fs", 1 / 16, "random"),
    ("ns 1/8", "ns", 1 / 8, "random"),
    ("bs 1/8 fixed", "bs", 1 / 8, "fixed"),
]


def _median_interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, sync: Callable[[], None], rounds: int = 3
) -> dict[str, float]:
    """:func:`bnrewrite.apps.bench_compiled.median_interleaved` (rounds that alternate between
    the variants, back-to-back timed calls within a round)."""
    from .bench_compiled import median_interleaved

    return median_interleaved(fns, reps, sync, rounds)


def _eager_table(args: Any, ctx: dict[str, Any], budget: _Budget, result: dict[str, Any]) -> None:
    """Forward + backward of one BN layer in eager mode (random upstream gradient): PyTorch's
    ``F.batch_norm`` against each sampled method through the eager lowering
    (:mod:`bnrewrite.eager`) and through the estimator's composite aten form (the route before
    the eager lowering, and the one the compilers trace)."""
    import torch

    device, dtype = ctx["device"], ctx["dtype"]
    shapes = EAGER_SMALL_SHAPES if args.small else EAGER_SHAPES
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(
        f"  eager rows (forward + backward, {str(dtype).replace('torch.', '')}, "
        f"{'channels-last' if args.layout == 'cl' else 'NCHW'}, median ms; ratio = time / "
        f"native BN):",
        flush=True,
    )
    for shape in shapes:
        if budget.left() < 10:
            result["skipped"].append(f"eager {shape}: budget ({budget.left():.0f} s left)")
            continue
        times = _eager_row(shape, device, dtype, args.layout, sync)
        base = times["native"]
        result["eager"].append(
            {
                "shape": list(shape),
                "times_ms": times,
                "ratio_vs_native": {k: v / base for k, v in times.items()},
            }
        )
        text = "x".join(map(str, shape))
        cells = [f"native {base:.3f}"] + [
            f"{k} {v:.3f} ({v / base:.2f}x)" for k, v in times.items() if k != "native"
        ]
        print(f"  {text:>16} | " + " | ".join(cells), flush=True)
        _free()


def _eager_row(
    shape: tuple[int, ...], device: str, dtype: Any, layout: str, sync: Callable[[], None]
) -> dict[str, float]:
    import torch

    from ..config import SamplingConfig
    from ..eager import eager_sampled_batch_norm
    from ..estimators import sampled_batch_norm as composite

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if layout == "cl" and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    c = shape[1]
    w = torch.ones(c, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(c, device=device, dtype=dtype, requires_grad=True)
    rm = torch.zeros(c, device=device, dtype=torch.float32)
    rv = torch.ones(c, device=device, dtype=torch.float32)

    def step(fwd: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> None:
            x.grad = w.grad = b.grad = None
            fwd(x, rm, rv, w, b).backward(dy)

        return run

    fns: dict[str, Callable[[], Any]] = {
        "native": step(lambda *a: torch.nn.functional.batch_norm(*a, True, 0.1, 1e-5))
    }
    for label, method, ratio, sampling in EAGER_METHODS:
        cfg = SamplingConfig(method, ratio=ratio, sampling=sampling)
        fns[f"eager {label}"] = step(
            lambda *a, cfg=cfg: eager_sampled_batch_norm(*a, True, 0.1, 1e-5, config=cfg)
        )
        fns[f"composite {label}"] = step(
            lambda *a, cfg=cfg: composite(*a, True, 0.1, 1e-5, config=cfg)
        )
    numel = math.prod(shape)
    reps = 15 if numel > 5e6 else (25 if numel > 2e5 else 41)
    return _median_interleaved(fns, reps, sync)


# ----------------------------------------------------------------------------------------------
# ResNet-50 training step
# ----------------------------------------------------------------------------------------------
def _e2e_variant(
    name: str, ctx: dict[str, Any], batch: int, size: int, steps: int
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from .. import convert_
    from ..config import SamplingConfig
    from ..kernels import convert_fused_
    from .resnet50 import ResNet50, resnet50

    device = ctx["device"]
    torch.manual_seed(0)
    if ctx["small"]:  # CI size: the same blocks, one per stage
        model = ResNet50(num_classes=10, layers=(1, 1, 1, 1)).to(device)
    else:
        model = resnet50().to(device)
    model = model.to(memory_format=torch.channels_last)
    kind, _, spec = name.partition(" ")
    cfg = None
    if spec:
        method, _, ratio = spec.partition(" ")
        cfg = SamplingConfig(method=method, ratio=ratio)
    if kind in ("fused", "fused+relu"):
        convert_fused_(model, cfg)
    elif kind == "torch":
        convert_(model, cfg)
    compile_ = ctx["e2e_compile"]
    net: Any = model
    if kind == "fused+relu":  # BN -> ReLU pairs run as one fused op (33 of ResNet-50's 53 BNs)
        from ..kernels import fuse_relu

        net = fuse_relu(model)
    if compile_ and kind.startswith("backend"):
        # torch.compile(backend="bnrewrite", options={..., "lowering": ...}) is make_backend(cfg)
        # with Inductor; calling it directly also works when the entry point is not installed
        from ..backend import make_backend

        lowering = "kernels" if kind == "backend+kernels" else "torch"
        runner = torch.compile(
            model, backend=make_backend(cfg, inner="inductor", lowering=lowering)
        )
    elif compile_:
        runner = torch.compile(net)
    else:
        runner = net
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    target = torch.randint(0, 10 if ctx["small"] else 1000, (batch,), device=device)
    amp = device == "cuda" and ctx["dtype"] != torch.float32

    def step() -> None:
        with torch.autocast(device, dtype=ctx["dtype"], enabled=amp):
            loss = F.cross_entropy(runner(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    return _timed_steps(step, sync, device, steps, model)


def _timed_steps(
    step: Callable[[], None], sync: Callable[[], None], device: str, steps: int, model: Any
) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t0
    step()
    sync()
    times = []
    for _ in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t1) * 1e3)
    ok = all(math.isfinite(p.float().sum().item()) for p in model.parameters())
    return {
        "step_ms": statistics.median(times),
        "step_ms_all": [round(t, 3) for t in times],
        "first_step_s": round(first_s, 2),
        "finite_params": ok,
    }


_E2E_KINDS = ("plain", "fused", "fused+relu", "backend", "backend+kernels", "torch")


def _e2e(
    args: Any, ctx: dict[str, Any], budget: _Budget, result: dict[str, Any], phase: str
) -> None:
    """ResNet-50 steps: ``phase="core"`` plain BN and the fused first method; ``"extra"`` the rest."""
    small = ctx["small"]
    batch = ctx["batch"] if small else (args.batch or 256)
    size = 64 if small else 224
    steps = args.e2e_steps or (2 if small else 15)
    methods = _parse_methods(args.methods)
    first = methods[0][1:] if methods else ("bs", 0.125)
    spec = f"{first[0]} {first[1]}"
    if args.e2e_variants:
        if phase != "core":
            return
        names = [v.strip() for v in args.e2e_variants.split(",") if v.strip()]
        bad = [
            n for n in names if n.split(" ")[0] not in _E2E_KINDS or (n != "plain" and " " not in n)
        ]
        if bad:
            raise ValueError(
                f"--e2e-variants: bad {bad[0]!r}; use 'plain' or '<kind> <method> <ratio>' with "
                f"kind one of {', '.join(_E2E_KINDS)}"
            )
    elif phase == "core":
        names = ["plain"]
        if ctx["kernels"]:  # the target: backend="bnrewrite" lowered to the kernels
            names += [f"backend+kernels {spec}", f"fused+relu {spec}"]
        if small:
            names.append(f"torch {spec}")
    elif small:
        return
    else:
        names = [f"fused {spec}"] if ctx["kernels"] else []
        names.append(f"backend {spec}")
        names += [f"fused {m} {r}" for _, m, r in methods[1:]] if ctx["kernels"] else []
        names.append(f"torch {spec}")
    if result["e2e"] is not None:
        out = result["e2e"]
        _e2e_run(names, ctx, budget, result, out, batch, size, steps)
        return
    out: dict[str, Any] = {
        "model": "resnet50 (torchvision architecture, bnrewrite.apps.resnet50)"
        if not small
        else "resnet50 blocks, one per stage (small mode)",
        "batch": batch,
        "input": [3, size, size],
        "dtype": "bf16 autocast" if (ctx["device"] == "cuda" and not small) else "fp32",
        "compile": ctx["e2e_compile"],
        "steps": steps,
        "variants": {},
    }
    result["e2e"] = out
    _e2e_run(names, ctx, budget, result, out, batch, size, steps)


def _e2e_run(
    names: list[str],
    ctx: dict[str, Any],
    budget: _Budget,
    result: dict[str, Any],
    out: dict[str, Any],
    batch: int,
    size: int,
    steps: int,
) -> None:
    small = ctx["small"]
    # first-compile estimate (s); replaced by what the previous variant took
    est = ctx.setdefault("e2e_estimate", 30.0 if small else 80.0)
    for name in names:
        if budget.left() < est * 1.15 + 5:
            result["skipped"].append(f"e2e {name}: budget ({budget.left():.0f} s left)")
            continue
        t0 = time.perf_counter()
        try:
            out["variants"][name] = _e2e_variant(name, ctx, batch, size, steps)
        except Exception as e:
            out["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        _free()
        spent = time.perf_counter() - t0
        out["variants"][name]["wall_s"] = round(spent, 1)
        if "error" not in out["variants"][name]:
            est = ctx["e2e_estimate"] = max(est * 0.5, spent)
        v = out["variants"][name]
        msg = f"{v['step_ms']:.2f} ms/step" if "step_ms" in v else v.get("error", "")
        print(f"  resnet50 {name:>18}: {msg} (wall {spent:.0f} s)", flush=True)
    base = out["variants"].get("plain", {}).get("step_ms")
    if base:
        for name, v in out["variants"].items():
            if "step_ms" in v:
                v["speedup_vs_plain"] = base / v["step_ms"]
                if name.startswith(("fused", "backend")) and not small:  # fused, fused+relu
                    v["target_1.20x"] = base / v["step_ms"] >= 1.20


# ----------------------------------------------------------------------------------------------
# breakdown (GPU): forward op, backward op and the offset draw, timed apart
# ----------------------------------------------------------------------------------------------
_CUDA = "cuda"


def _breakdown(args: Any, ctx: dict[str, Any], budget: _Budget, result: dict[str, Any]) -> None:
    """Per-op times (GPU) of the first shapes: where a layer's time goes, against its roofline."""
    if ctx["device"] != "cuda" or not ctx["kernels"] or ctx["small"]:
        return
    import torch

    from ..config import SamplingConfig
    from ..estimators import draw_offsets
    from ..kernels import fused_bn_backward, fused_bn_forward
    from ..plan import sample_plan

    out: list[dict[str, Any]] = []
    result["breakdown"] = out
    shapes = [(ctx["batch"], *s) for s in ANCHOR_SHAPES]
    for shape in shapes:
        for label, method, ratio in _parse_methods(args.methods):
            if budget.left() < 10:
                result["skipped"].append(f"breakdown {shape} {label}: budget")
                return
            entry: dict[str, Any] = {"shape": list(shape), "method": label}
            try:
                cfg = SamplingConfig(method=method, ratio=ratio)
                plan = sample_plan(shape, cfg)
                C = shape[1]
                x = torch.randn(shape, device="cuda", dtype=ctx["dtype"])
                x = x.to(memory_format=torch.channels_last)
                dy = torch.randn_like(x)
                w, b = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
                rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
                off = draw_offsets(plan, x.device)
                conf = (method, float(ratio), int(cfg.groups), cfg.sampling, int(cfg.vdn_samples))
                fwd_args = (x, w, b, rm, rv, off, 0.1, None, *conf, 1e-5, False, None)
                _, mean, var, _, _ = fused_bn_forward(*fwd_args)
                bwd_args = (dy, x, mean, var, w, b, off, *conf, 1e-5, False, None)
                entry["forward"] = _time(lambda a=fwd_args: fused_bn_forward(*a), "cuda")
                entry["backward"] = _time(lambda a=bwd_args: fused_bn_backward(*a), "cuda")
                entry["draw_offsets"] = _time(lambda p=plan: draw_offsets(p, _CUDA), "cuda")
                numel = math.prod(shape)
                item = torch.empty((), dtype=ctx["dtype"]).element_size()
                f = plan.count() / (numel // C)
                entry["sample_fraction"] = f
                entry["roofline_fwd_ms"] = roofline_ms(numel, item, 2 + f)
                entry["roofline_bwd_ms"] = roofline_ms(numel, item, 3 + 3 * f)
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out.append(entry)
            _free()
            if "error" not in entry:
                fw, bw = _best(entry["forward"]), _best(entry["backward"])
                print(
                    f"  breakdown {'x'.join(map(str, shape))} {label}: forward {fw:.3f} ms "
                    f"(roofline {entry['roofline_fwd_ms']:.3f}), backward {bw:.3f} ms (roofline "
                    f"{entry['roofline_bwd_ms']:.3f}), offsets {_best(entry['draw_offsets']):.3f}",
                    flush=True,
                )


# ----------------------------------------------------------------------------------------------
# tuning pass (GPU, last, budget permitting): block shapes of the whole-tensor kernels
# ----------------------------------------------------------------------------------------------
TUNE_CONFIGS: list[dict[str, Any]] = [
    {"tile": 2048, "warps": 4},
    {"tile": 4096, "warps": 4},
    {"tile": 4096, "warps": 8},
    {"tile": 8192, "warps": 8},
    {"tile": 8192, "warps": 16},
    {"tile": 4096, "max_bc": 64},
    {"bwd_progs_per_sm": 4},
    {"bwd_progs_per_sm": 16},
]


def _tune(args: Any, ctx: dict[str, Any], budget: _Budget, result: dict[str, Any]) -> None:
    """Time the first sampled method through the kernels under a few launch heuristics."""
    if ctx["device"] != "cuda" or not ctx["kernels"] or ctx["small"]:
        return
    import torch

    from ..kernels.ops import tuning

    methods = _parse_methods(args.methods)[:1]
    label = methods[0][0]
    shapes = [(ctx["batch"], *s) for s in (ANCHOR_SHAPES[0], ANCHOR_SHAPES[1], ANCHOR_SHAPES[3])]
    out: list[dict[str, Any]] = []
    result["tuning"] = out
    for shape in shapes:
        for conf in [{}, *TUNE_CONFIGS]:
            if budget.left() < 8:
                result["skipped"].append(f"tuning {shape} {conf}: budget")
                return
            entry: dict[str, Any] = {"shape": list(shape), "config": conf}
            try:
                with tuning(**conf):
                    variants = _layer_variants(
                        shape, ctx["dtype"], "cuda", args.layout, methods, "base", True
                    )
                    fn = variants[f"kernels {label}"]
                    entry.update(_time(fn, "cuda"))
                del variants
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out.append(entry)
            _free()
            torch.cuda.synchronize()
        rows = [e for e in out if e["shape"] == list(shape) and _best(e)]
        if rows:
            best = min(rows, key=_best)
            print(f"  tuning {shape}: best {best['config'] or 'default'} {_best(best):.3f} ms")


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def _bandwidth(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch
    import triton.testing as tt

    bufs = [torch.empty(1 << 29, dtype=torch.float16, device="cuda") for _ in range(2)]  # 1 GiB
    ms = tt.do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=5, rep=30, return_mode="median")
    bufs.clear()
    _free()
    return 2 * (1 << 30) / (ms * 1e-3)


SECTIONS = (
    "checks",
    "eager",
    "layers",
    "e2e",
    "breakdown",
    "compile",
    "e2e-extra",
    "tune",
    "compiled",
)


def _sections(args: argparse.Namespace) -> set[str]:
    default = ",".join(s for s in SECTIONS if s != "compiled")  # compiled: its own run
    chosen = [v.strip() for v in (args.sections or default).split(",") if v.strip()]
    unknown = [v for v in chosen if v not in SECTIONS]
    if unknown:
        raise ValueError(f"--sections: unknown {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    out = set(chosen)
    if args.no_check:
        out.discard("checks")
    if args.no_e2e:
        out -= {"e2e", "e2e-extra"}
    if args.no_tune:
        out.discard("tune")
    if args.e2e_variants:
        out.discard("e2e-extra")
        out.add("e2e")
    return out


def run(args: argparse.Namespace) -> int:
    budget = _Budget(args.budget_s)
    _sections(args)  # bad values: one line, before any output
    if args.interpret:
        if args.device == "cuda":
            raise ValueError("--interpret runs the kernels on the CPU; drop --device cuda")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if args.interpret:
        device = "cpu"
    small = args.small or device == "cpu"
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = getattr(torch, _DTYPES[dtype_name])
    batch = args.batch or (4 if small else 256)

    from ..kernels import kernels_available, use_interpreter

    if device == "cpu":  # this CLI's own process: the C++ code-generation workarounds apply here
        from ..backend import _cpp_workarounds

        for key, value in _cpp_workarounds().items():
            section, _, name = key.partition(".")
            setattr(getattr(torch._inductor.config, section), name, value)
    kernels = False
    if device == "cuda":
        kernels = kernels_available()
    elif args.interpret:
        kernels = use_interpreter()
    ctx = {
        "device": device,
        "dtype": dtype,
        "small": small,
        "batch": batch,
        "kernels": kernels,
        "e2e_compile": device == "cuda" or args.compile in ("anchors", "all"),
    }
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name()
            if device == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "triton": triton_version,
            "python": platform.python_version(),
            "mode": "gpu" if not small else "small",
            "dtype": dtype_name,
            "layout": args.layout,
            "batch": batch,
            "methods": args.methods,
            "kernels": kernels,
            "roofline_bw": ROOFLINE_BW,
            "roofline": "5 passes x bytes / 4.2e12 B/s (ANCHORS.md)",
            "timing": "median of triton.testing.do_bench (ms) and do_bench_cudagraph (graph_ms)"
            if device == "cuda"
            else "median of time.perf_counter over 5 runs",
            "argv": sys.argv[1:],
        },
        "checks": [],
        "eager": [],
        "layers": [],
        "e2e": None,
        "compiled": None,
        "skipped": [],
        "errors": [],
    }
    print(
        f"bnrewrite bench: {result['meta']['device']}, torch {torch.__version__}, triton "
        f"{triton_version}, {dtype_name}, {'small' if small else 'full'} mode, kernels={kernels}",
        flush=True,
    )
    if device == "cuda":
        result["meta"]["copy_bw_measured"] = _bandwidth(device)
        print(f"  copy bandwidth {result['meta']['copy_bw_measured'] / 1e12:.2f} TB/s", flush=True)
    sections = _sections(args)
    result["meta"]["sections"] = sorted(sections)
    if "checks" in sections and kernels:
        result["checks"] = _checks(device, dtype, small)
        bad = [c for c in result["checks"] if not c["ok"]]
        print(
            f"  checks: {len(result['checks']) - len(bad)}/{len(result['checks'])} ok", flush=True
        )
    # cheap rows first, then the ResNet-50 step, then what needs many compiles; a phase that
    # fails is recorded and the run goes on, so the JSON is always written
    phases: list[tuple[str, Callable[[], None]]] = []
    if "eager" in sections:
        phases.append(("eager", lambda: _eager_table(args, ctx, budget, result)))
    if "layers" in sections:
        phases.append(("layers", lambda: _layer_table(args, ctx, budget, result, "base")))
    if "e2e" in sections:
        phases.append(("e2e core", lambda: _e2e(args, ctx, budget, result, "core")))
    if "breakdown" in sections:
        phases.append(("breakdown", lambda: _breakdown(args, ctx, budget, result)))
    if "compile" in sections:
        phases.append(
            ("layers compile", lambda: _layer_table(args, ctx, budget, result, "compile"))
        )
    if "e2e-extra" in sections:
        phases.append(("e2e extra", lambda: _e2e(args, ctx, budget, result, "extra")))
    if "tune" in sections:
        phases.append(("tuning", lambda: _tune(args, ctx, budget, result)))
    if "compiled" in sections:
        phases.append(("compiled", lambda: _compiled_table(args, ctx, budget, result)))
    for name, phase in phases:
        try:
            phase()
        except Exception as e:
            if isinstance(e, ValueError) and name == "layers":
                raise  # a bad --shapes / --methods: one line on the CLI
            msg = f"{name}: {type(e).__name__}: {str(e)[:400]}"
            result["errors"].append(msg)
            print(f"  error in {msg}", flush=True)
            _free()
    result["meta"]["elapsed_s"] = round(budget.elapsed(), 1)
    _summary(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"  wrote {args.out}", flush=True)
    failed = [c for c in result["checks"] if not c["ok"]]
    return 1 if failed or result["errors"] else 0


def _compiled_table(
    args: Any, ctx: dict[str, Any], budget: _Budget, result: dict[str, Any]
) -> None:
    """The compiled route against compiled BN (:mod:`bnrewrite.apps.bench_compiled`): layer
    rows (Inductor's passes, kernels, times) per shape and layout, then the ResNet-50 step."""
    from . import bench_compiled as bc

    device, dtype = ctx["device"], ctx["dtype"]
    shapes = bc.SMALL_LAYER_SHAPES if args.small else bc.LAYER_SHAPES
    if args.shapes and args.shapes not in ("all", "anchors"):
        shapes = _parse_shapes(args.shapes, False, args.batch or 64)
    layouts = ("nchw", "cl")
    rows = bc.layer_rows(shapes, layouts, device, dtype, left=budget.left)
    bc.print_layer_rows(rows)
    out: dict[str, Any] = {"layers": rows, "model": None}
    result["compiled"] = out
    if args.no_e2e:
        return
    if budget.left() < 120:
        result["skipped"].append(f"compiled model: budget ({budget.left():.0f} s left)")
        return
    if args.small:
        out["model"] = bc.model_rows(batch=2, size=32, steps=3, device=device, small=True)
    elif device == "cuda":
        out["model"] = bc.model_rows(batch=128, size=224, steps=9, device=device)
    else:
        out["model"] = bc.model_rows(batch=16, size=112, steps=9, device=device)
    bc.print_model_rows(out["model"])


def _summary(result: dict[str, Any]) -> None:
    """Where each issue-8 target stands (GPU runs); stored under ``result["targets"]``."""
    targets: dict[str, Any] = {}
    for row in result.get("layers", []):
        for name, r in row.get("ratios", {}).items():
            keys = [k for k in r if k.startswith("target_")]
            if keys:
                shape = "x".join(str(s) for s in row["shape"])
                targets[f"{shape} {name}"] = {k: r[k] for k in keys}
    e2e = result.get("e2e") or {}
    for name, v in (e2e.get("variants") or {}).items():
        if "target_1.20x" in v:
            targets[f"resnet50 {name}"] = {"target_1.20x": v["target_1.20x"]}
    result["targets"] = targets
    if targets:
        met = sum(all(v.values()) for v in targets.values())
        print(f"  targets met: {met}/{len(targets)}", flush=True)
    print(f"  elapsed {result['meta']['elapsed_s']} s; skipped: {len(result['skipped'])}")
