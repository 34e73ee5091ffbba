"""``bnrewrite bench --sections compiled``: the compiled route against compiled BatchNorm.

Two tables, every number of a table measured side by side in one run:

* **layers** -- one BN layer in training mode, forward + backward (random upstream gradient),
  per shape and layout: ``torch.compile`` of ``nn.BatchNorm2d`` (Inductor) and the same module
  under ``backend="bnrewrite"`` with ``full``, ``bs`` 1/8, ``fs`` 1/16 and ``ns`` 1/8 (random
  sampling). For each: Inductor's own count of the bytes its fused kernels move, forward and
  backward graphs together (``GraphLowering.count_bytes``, divided by the activation's bytes:
  "passes"; the fusion plan, the same on every run), the number of kernels it generated, and the
  median time of a step; ratios are time / compiled BN's time.
* **model** -- one SGD step of the project's ResNet-50 (:mod:`bnrewrite.apps.resnet50`,
  channels-last) compiled with plain BN, under the backend with ``bs`` 1/8 and ``fs`` 1/16, and
  with every BN replaced by a per-channel affine map with no statistics at all (the ceiling of any
  BatchNorm speed-up on the model); ratios are compiled BN's time / the variant's (speed-ups).

Times are medians over rounds that alternate between the variants (:func:`median_interleaved`),
so a noisy, shared machine slows every variant alike. The FX-graph and AOTAutograd caches are
off while compiling, so that Inductor counts every graph.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "LAYER_SHAPES",
    "LAYER_VARIANTS",
    "MODEL_VARIANTS",
    "inductor_passes",
    "triton_plan_passes",
    "counting_bytes",
    "median_interleaved",
    "affine_only_",
    "layer_rows",
    "model_rows",
    "print_layer_rows",
    "print_model_rows",
]

#: Issue 23's shapes (N, C, H, W).
LAYER_SHAPES: list[tuple[int, int, int, int]] = [
    (64, 64, 28, 28),
    (128, 256, 14, 14),
    (32, 128, 56, 56),
    (256, 64, 56, 56),
]
SMALL_LAYER_SHAPES: list[tuple[int, int, int, int]] = [(16, 8, 8, 8)]
#: (label, backend, options) of the layer table; the first is the baseline.
LAYER_VARIANTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("compiled BN", "inductor", None),
    ("full", "bnrewrite", {"method": "full"}),
    ("bs 1/8", "bnrewrite", {"method": "bs", "ratio": 0.125}),
    ("fs 1/16", "bnrewrite", {"method": "fs", "ratio": 0.0625}),
    ("ns 1/8", "bnrewrite", {"method": "ns", "ratio": 0.125}),
]
#: (label, kind, options) of the model table; the first is the baseline.
MODEL_VARIANTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("compiled BN", "plain", None),
    ("backend bs 1/8", "backend", {"method": "bs", "ratio": 0.125}),
    ("backend fs 1/16", "backend", {"method": "fs", "ratio": 0.0625}),
    ("no statistics (ceiling)", "affine", None),
]


@contextlib.contextmanager
def counting_bytes() -> Iterator[Any]:
    """Inductor counts the bytes of every graph it compiles inside (``metrics``), caches off.

    Turns on the ``inductor_metrics`` artifact log without printing it (what
    ``torch._logging.set_logs(inductor_metrics=True)`` enables, less the output).
    """
    import torch
    from torch._inductor import compile_fx, metrics

    log = compile_fx.inductor_metrics_log
    saved = (log.level, log.propagate, list(log.handlers))
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers = [logging.NullHandler()]
    metrics.reset()
    try:
        with (
            torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            yield metrics
    finally:
        log.setLevel(saved[0])
        log.propagate = saved[1]
        log.handlers = saved[2]


def _layer(
    backend: str,
    options: dict[str, Any] | None,
    shape: Sequence[int],
    channels_last: bool,
    device: str = "cpu",
    dtype: Any = None,
    inner: Any = "inductor",
) -> tuple[Callable[[], None], Any]:
    """A compiled ``nn.BatchNorm2d`` step (forward + backward) and its input. ``inner``: what
    compiles the (rewritten) Dynamo graph -- Inductor, or a backend callable."""
    import torch
    from torch import nn

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(shape[1]).to(device).train()
    if backend == "inductor":
        fn = torch.compile(bn, backend=inner)
    elif inner == "inductor":
        from ..backend import make_backend

        fn = torch.compile(bn, backend=make_backend(options, inner="inductor"))
    else:
        from ..backend import make_backend

        rewrite = make_backend(options, inner="eager")

        def rewrite_then(gm: Any, inputs: Any) -> Any:
            rewrite(gm, inputs)  # rewrites gm in place
            return inner(gm, inputs)

        fn = torch.compile(bn, backend=rewrite_then)

    def step() -> None:
        x.grad = None
        fn(x).backward(dy)

    return step, x


def inductor_passes(
    backend: str,
    options: dict[str, Any] | None,
    shape: Sequence[int],
    channels_last: bool,
    device: str = "cpu",
) -> tuple[float, int]:
    """Inductor's count for one BN layer, forward + backward: ``(passes, kernels)`` -- bytes
    moved by its fused kernels / the activation's bytes, and the kernels it generated."""
    _, passes, kernels = _counted_layer(backend, options, shape, channels_last, device)
    return passes, kernels


def _counted_layer(
    backend: str,
    options: dict[str, Any] | None,
    shape: Sequence[int],
    channels_last: bool,
    device: str = "cpu",
    dtype: Any = None,
) -> tuple[Callable[[], None], float, int]:
    """The layer's step, compiled (forward and backward) while Inductor counts: ``(step,
    passes, kernels)``."""
    import torch

    torch._dynamo.reset()
    with counting_bytes() as metrics:
        step, x = _layer(backend, options, shape, channels_last, device, dtype)
        step()
        passes = metrics.num_bytes_accessed / (x.numel() * x.element_size())
        return step, passes, metrics.generated_kernel_count


class _PlanCounted(Exception):
    """Raised after the scheduler fused a graph: its count is taken, no code is generated."""


def triton_plan_passes(
    backend: str, options: dict[str, Any] | None, shape: Sequence[int], channels_last: bool
) -> tuple[float, float]:
    """Inductor's count of one BN layer under *Triton's* fusion rules, on the CPU without a GPU:
    ``(forward passes, backward passes)``.

    The layer's forward and backward graphs are captured through AOTAutograd (Inductor's
    decompositions, ``fallback_random``) and lowered by Inductor with ``cpu_backend="triton"``;
    after the scheduler has fused each graph, ``GraphLowering.count_bytes`` is read and code
    generation is stopped (no Triton CPU driver is needed). This is the fusion plan a GPU gets
    (``tests/test_compiled.py`` checks it; the GPU run measures the real one).
    """
    import torch
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor import config as inductor_config
    from torch._inductor import scheduler as inductor_scheduler
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.virtualized import V

    graphs: list[Any] = []

    def keep(gm: Any, _inputs: Any) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def aot(gm: Any, inputs: Any) -> Any:
        return aot_module_simplified(
            gm, inputs, fw_compiler=keep, bw_compiler=keep, decompositions=select_decomp_table()
        )

    counted: list[int] = []

    def count_and_stop(self: Any) -> None:
        counted.append(V.graph.count_bytes()[0])
        raise _PlanCounted

    def real(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        t = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype)
        return t.normal_() if t.is_floating_point() else t.zero_()

    saved = inductor_scheduler.Scheduler.codegen
    torch._dynamo.reset()
    with inductor_config.patch(cpu_backend="triton", fallback_random=True, fx_graph_cache=False):
        step, x = _layer(backend, options, shape, channels_last, inner=aot)
        step()  # captures the forward and backward graphs
        inductor_scheduler.Scheduler.codegen = count_and_stop
        try:
            for i, gm in enumerate(graphs):
                inputs = [real(n.meta["val"]) for n in gm.graph.nodes if n.op == "placeholder"]
                try:
                    compile_fx_inner(gm, inputs)
                except Exception:  # Inductor wraps the stop in its own error
                    if len(counted) != i + 1:  # failed before the scheduler: a real error
                        raise
        finally:
            inductor_scheduler.Scheduler.codegen = saved
    torch._dynamo.reset()
    nbytes = x.numel() * x.element_size()
    return counted[0] / nbytes, sum(counted[1:]) / nbytes


def median_interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, sync: Callable[[], None], rounds: int = 3
) -> dict[str, float]:
    """Median ms of each function over ``rounds`` rounds; in a round each function runs one
    warm-up call and then ``reps // rounds`` timed calls back to back. Rounds alternate between
    the variants, so that a noisy, shared machine slows every variant alike, while back-to-back
    calls keep one variant's allocations from disturbing the next one's timing."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, reps // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            sync()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _without_caches(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with Inductor's FX-graph cache and AOTAutograd's cache off: every variant is
    compiled from the current code. (A step recompiles after ``torch._dynamo.reset()``; with the
    caches on, that recompile was seen to load an artifact of an earlier version of the compiled
    lowering -- the cache key did not see the change inside its ``autograd.Function`` -- and
    time it: ``fs`` 1/16 read 3.2x compiled BN at 128x256x14x14 where the current code runs
    at 1.1x.)"""
    import functools

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with (
            torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            return fn(*args, **kwargs)

    return run


@_without_caches
def layer_rows(
    shapes: Sequence[Sequence[int]],
    layouts: Sequence[str] = ("nchw", "cl"),
    device: str = "cpu",
    dtype: Any = None,
    reps: int | None = None,
    left: Callable[[], float] = lambda: math.inf,
) -> list[dict[str, Any]]:
    """One row per shape and layout: passes, kernels and median ms of each layer variant."""
    import torch

    rows = []
    for shape in shapes:
        for layout in layouts:
            if left() < 30:
                rows.append({"shape": list(shape), "layout": layout, "skipped": "time budget"})
                continue
            cl = layout == "cl"
            steps: dict[str, Callable[[], None]] = {}
            counts: dict[str, dict[str, float]] = {}
            for label, backend, options in LAYER_VARIANTS:
                step, passes, kernels = _counted_layer(backend, options, shape, cl, device, dtype)
                counts[label] = {"passes": round(passes, 3), "kernels": kernels}
                if device == "cpu":  # the plan a GPU gets (Triton's fusion rules)
                    fwd, bwd = triton_plan_passes(backend, options, shape, cl)
                    counts[label]["passes_triton_plan"] = round(fwd + bwd, 3)
                steps[label] = step
            numel = math.prod(shape)
            n = reps or (9 if numel > 2e7 else (15 if numel > 5e6 else 30))
            times = median_interleaved(steps, n, _sync(device))
            base = times[LAYER_VARIANTS[0][0]]
            rows.append(
                {
                    "shape": list(shape),
                    "layout": layout,
                    "variants": {
                        k: {**counts[k], "ms": round(v, 4), "ratio": round(v / base, 3)}
                        for k, v in times.items()
                    },
                }
            )
            steps.clear()
            torch._dynamo.reset()
    return rows


def affine_only_(model: Any) -> Any:
    """Replace every BatchNorm of ``model`` in place by ``y = x * w + b`` per channel (its own
    parameters, no statistics): the ceiling of any BN speed-up on the model."""
    from torch import nn

    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _affine_class()(child))
        else:
            affine_only_(child)
    return model


def _affine_class() -> Any:
    import torch
    from torch import nn

    class Affine(nn.Module):
        def __init__(self, bn: nn.Module) -> None:
            super().__init__()
            self.weight, self.bias = bn.weight, bn.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = [1, -1] + [1] * (x.dim() - 2)
            return x * self.weight.view(shape) + self.bias.view(shape)

    return Affine


@_without_caches
def model_rows(
    batch: int = 16,
    size: int = 112,
    steps: int = 9,
    device: str = "cpu",
    small: bool = False,
) -> dict[str, Any]:
    """One SGD step of ResNet-50 per variant (``MODEL_VARIANTS``), median ms and speed-ups
    (bf16 autocast on CUDA, float32 on the CPU)."""
    import torch
    import torch.nn.functional as F

    from ..backend import make_backend
    from .resnet50 import ResNet50, resnet50

    fns: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    for label, kind, options in MODEL_VARIANTS:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = ResNet50(num_classes=10, layers=(1, 1, 1, 1)) if small else resnet50(10)
        model = model.to(device).to(memory_format=torch.channels_last).train()
        if kind == "affine":
            affine_only_(model)
        if kind == "backend":
            runner = torch.compile(model, backend=make_backend(options, inner="inductor"))
        else:
            runner = torch.compile(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, size, size, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (batch,), device=device)

        def step(runner: Any = runner, opt: Any = opt, x: Any = x, target: Any = target) -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = F.cross_entropy(runner(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step()
        _sync(device)()
        compile_s[label] = round(time.perf_counter() - t0, 1)
        fns[label] = step
    times = median_interleaved(fns, steps, _sync(device))
    base = times[MODEL_VARIANTS[0][0]]
    return {
        "batch": batch,
        "size": size,
        "variants": {
            k: {"ms": round(v, 3), "speedup": round(base / v, 3), "first_step_s": compile_s[k]}
            for k, v in times.items()
        },
    }


def print_layer_rows(rows: list[dict[str, Any]]) -> None:
    print(
        "  compiled layer rows (forward + backward; passes = Inductor's bytes / activation "
        "bytes, [T ...] the same under Triton's fusion rules (the GPU's plan), k = kernels; "
        "ratio = time / compiled BN):",
        flush=True,
    )
    for row in rows:
        text = "x".join(map(str, row["shape"])) + " " + row["layout"]
        if "skipped" in row:
            print(f"  {text:>22} | skipped ({row['skipped']})", flush=True)
            continue
        cells = [
            f"{k} {v['passes']:.2f}p"
            + (f" [T {v['passes_triton_plan']:.2f}p]" if "passes_triton_plan" in v else "")
            + f" {v['kernels']}k {v['ms']:.3f} ms ({v['ratio']:.2f}x)"
            for k, v in row["variants"].items()
        ]
        print(f"  {text:>22} | " + " | ".join(cells), flush=True)


def print_model_rows(model: dict[str, Any]) -> None:
    print(
        f"  ResNet-50 SGD step (batch {model['batch']}, {model['size']}x{model['size']}, "
        "channels-last, compiled; speed-up = compiled BN / variant):",
        flush=True,
    )
    for k, v in model["variants"].items():
        print(f"  {k:>26} | {v['ms']:.1f} ms | {v['speedup']:.3f}x", flush=True)
