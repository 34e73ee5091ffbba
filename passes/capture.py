"""Capturing an ``nn.Module`` for the graph passes: ``torch.fx.symbolic_trace``, or ``torch.export``.

``symbolic_trace`` runs the model's ``forward`` on proxies: control flow on a value, ``int()`` of a
size, iterating over a size or assigning into a traced list stop it, and most real model code does
one of those. ``torch.export`` traces with example inputs instead (sizes are numbers, Python
control flow on them runs), so :func:`capture` takes that route when ``symbolic_trace`` fails and
the caller gave ``example_inputs``:

* non-strict ``torch.export.export`` (Python runs the model's code as it is), then strict export
  (Dynamo) when that fails, with the batch dimension of every tensor input ``Dim.AUTO`` (a later
  batch of another size, such as the last smaller one, runs the same program; every other size
  is fixed by the example);
* the model is exported in training mode (a structure-sharing copy of it, so the user's module
  flags never change): the graph the passes rewrite is the training step;
* the result (:class:`CapturedModel`) owns nothing: its parameters, buffers and module tree are
  the model's (:func:`bnrewrite.modules.share_structure`), so an optimizer built on
  ``model.parameters()`` trains it, the running statistics it updates are the model's, and its
  ``state_dict`` keys are the model's. In training mode it runs the rewritten program; in eval
  mode it runs the model's own ``forward`` (what the model computes, for any input shape).

Without ``example_inputs`` a model ``symbolic_trace`` cannot trace gets one
:class:`UntraceableModelError` naming the user's source line where tracing stopped and the routes
that work: ``example_inputs=``, ``bnrewrite.convert_`` and ``torch.compile(backend="bnrewrite")``.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.modules import share_structure

__all__ = [
    "CAPTURES",
    "CapturedModel",
    "UntraceableModelError",
    "capture",
    "export_training",
    "user_line",
    "where_tracing_stopped",
]

#: How ``rewrite`` turns an ``nn.Module`` into a graph: ``"auto"`` -- ``symbolic_trace``, then
#: ``torch.export`` on ``example_inputs`` when tracing fails; ``"fx"`` -- ``symbolic_trace`` only;
#: ``"export"`` -- ``torch.export`` only (needs ``example_inputs``).
CAPTURES: tuple[str, ...] = ("auto", "fx", "export")

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) for p in (__file__, __import__("bnrewrite").__file__)
)


class UntraceableModelError(ValueError):
    """``symbolic_trace`` (or ``torch.export``) could not capture the model; the message says where
    and which routes work. ``trace_error`` is the tracer's own exception."""

    def __init__(self, message: str, trace_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.trace_error = trace_error


def _routes(what: str) -> str:
    return (
        "Routes that work on such models: "
        f"bnrewrite.rewrite(model, cfg, example_inputs=(x,)) (captures it with torch.export{what}), "
        "bnrewrite.convert_(model, cfg) (swaps the BatchNorm modules in place, eager and "
        "compiled), or torch.compile(model, backend='bnrewrite', options={'method': ..., ...})."
    )


def _is_library(path: str) -> bool:
    path = os.path.abspath(path)
    return path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIRS) or path.startswith("<")


def user_line(stack_trace: str) -> str | None:
    """``"file:line: source"`` of the innermost frame of a node's ``meta["stack_trace"]`` (the text
    Dynamo and export record) that is not torch's or bnrewrite's; ``None`` when there is none."""
    lines = [ln.strip() for ln in str(stack_trace).strip().splitlines()]
    for i in reversed(range(len(lines))):
        m = re.match(r'^File "([^"]+)", line (\d+)', lines[i])
        if m and not _is_library(m.group(1)):
            code = (
                lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            )
            return f"{m.group(1)}:{m.group(2)}" + (f": {code}" if code else "")
    return None


def where_tracing_stopped(error: BaseException) -> str | None:
    """``"file:line in function: source"`` of the innermost frame of ``error``'s traceback that is
    the user's code (not torch's, not bnrewrite's); ``None`` when there is none."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if _is_library(frame.filename):
            continue
        line = (frame.line or "").strip()
        return f"{frame.filename}:{frame.lineno} in {frame.name}: {line}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _symbolic_trace(model: nn.Module, tracer_kwargs: Mapping[str, Any] | None) -> fx.GraphModule:
    return fx.symbolic_trace(model, **dict(tracer_kwargs or {}))


def _batch_dynamic(args: Sequence[Any]) -> tuple[Any, ...]:
    """``dynamic_shapes`` for ``args``: dim 0 of every tensor ``Dim.AUTO``, the rest static."""

    def spec(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return {0: torch.export.Dim.AUTO}
        return None

    return tuple(torch.utils._pytree.tree_map(spec, list(args)))


def export_training(model: nn.Module, example_inputs: Sequence[Any]) -> Any:
    """``torch.export`` of ``model`` in training mode on ``example_inputs``.

    Exports a structure-sharing copy (the user's module flags are not touched): every module in
    training mode when the model is in eval mode, the modes as they are otherwise (a frozen BN
    stays frozen). Non-strict first, strict when that fails; batch dim ``Dim.AUTO``. Raises
    :class:`UntraceableModelError` with both exporters' reasons when neither captures it.
    """
    args = tuple(example_inputs)
    view = share_structure(model)
    if not view.training:
        view.train()
    errors: list[tuple[str, BaseException]] = []
    for strict in (False, True):
        try:
            return torch.export.export(
                view, args, dynamic_shapes=_batch_dynamic(args), strict=strict
            )
        except Exception as error:  # noqa: BLE001 -- reported below, with the next route tried
            errors.append(("strict" if strict else "non-strict", error))
    lines = []
    for kind, error in errors:
        where = where_tracing_stopped(error)
        lines.append(
            f"  {kind} torch.export: {_first_line(error)}" + (f"\n    at {where}" if where else "")
        )
    raise UntraceableModelError(
        f"bnrewrite: torch.export could not capture {type(model).__name__} on the example inputs:\n"
        + "\n".join(lines)
        + "\nbnrewrite.convert_(model, cfg) or torch.compile(model, backend='bnrewrite') rewrite "
        "it without a whole-graph capture.",
        errors[0][1],
    ) from None


def capture(
    model: nn.Module,
    *,
    example_inputs: Sequence[Any] | None,
    tracer_kwargs: Mapping[str, Any] | None = None,
    mode: str = "auto",
    trace: Callable[[nn.Module], fx.GraphModule] | None = None,
) -> fx.GraphModule | Any:
    """``model`` as a graph: the ``symbolic_trace`` GraphModule, or (``mode="export"``, or
    ``"auto"`` when tracing fails and ``example_inputs`` are given) a training-mode
    ``ExportedProgram`` (:func:`export_training`). ``trace`` replaces ``symbolic_trace`` (the
    caller's own tracing of a prepared copy). Raises :class:`UntraceableModelError`."""
    if mode not in CAPTURES:
        raise ValueError(f"capture must be one of {', '.join(map(repr, CAPTURES))}, got {mode!r}")
    if mode == "export":
        if example_inputs is None:
            raise ValueError("capture='export' needs example_inputs=(x, ...) to export the model")
        return export_training(model, example_inputs)
    tracer = trace or (lambda m: _symbolic_trace(m, tracer_kwargs))
    try:
        return tracer(model)
    except Exception as error:  # noqa: BLE001 -- any tracer failure gets the one explanation
        if mode == "auto" and example_inputs is not None:
            return export_training(model, example_inputs)
        where = where_tracing_stopped(error)
        at = f" at {where}" if where else ""
        raise UntraceableModelError(
            f"bnrewrite: torch.fx.symbolic_trace cannot trace {type(model).__name__}: tracing "
            f"stopped{at} ({_first_line(error)}). symbolic_trace runs forward on proxies, so "
            f"Python control flow, int(), iteration or item assignment on traced values stop it. "
            + _routes(" on those inputs" if mode == "auto" else ", with capture='export'"),
            error,
        ) from None


# -- the result -----------------------------------------------------------------------------------
class CapturedModel(nn.Module):
    """A model rewritten through ``torch.export``: the rewritten program in training mode, the
    model's own ``forward`` in eval mode.

    Its module tree *is* a structure-sharing copy of the model's (the same ``_parameters``,
    ``_buffers`` and ``_modules`` tables), so ``parameters()``, ``state_dict()`` keys,
    ``.train()`` / ``.eval()`` and ``.to()`` act on the model's tensors; the program's attributes
    are re-pointed at those tensors before each training call (after ``.to()`` they are new
    tensors). ``meta["bnrewrite"]`` is the rewrite report; ``program`` the rewritten
    ``ExportedProgram`` (``None`` for VDN, whose graph is rewritten after unlifting) and
    ``graph_module`` the training-mode GraphModule it runs.
    """

    def __init__(
        self, model: nn.Module, graph_module: fx.GraphModule, program: Any, report: Any
    ) -> None:
        super().__init__()
        view = share_structure(model)
        d = self.__dict__
        d["_parameters"] = view._parameters
        d["_buffers"] = view._buffers
        d["_modules"] = view._modules
        d["_non_persistent_buffers_set"] = view._non_persistent_buffers_set
        d["_eval_forward"] = view
        d["graph_module"] = graph_module
        d["program"] = program
        d["meta"] = {"bnrewrite": report}
        d["_model_name"] = type(model).__name__
        self.training = model.training
        view.training = model.training
        names = [n for n, _ in graph_module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in graph_module.named_buffers(remove_duplicate=False)]
        # (this module's table, the program's table, key) per tensor, resolved once: the tables
        # are the same dict objects for the module's life (``.to()`` replaces their entries)
        d["_state_slots"] = [
            (mine.__dict__[table], theirs.__dict__[table], leaf)
            for name in names
            if _has_tensor(self, name)
            for owner, _, leaf in [name.rpartition(".")]
            for mine, theirs in [(self.get_submodule(owner), graph_module.get_submodule(owner))]
            for table in ("_parameters", "_buffers")
            if leaf in mine.__dict__[table]
        ]

    def train(self, mode: bool = True) -> CapturedModel:
        super().train(mode)
        self.__dict__["_eval_forward"].training = mode
        return self

    def _sync(self) -> None:
        """Point the program's parameters and buffers at this module's current tensors."""
        for mine, theirs, leaf in self.__dict__["_state_slots"]:
            value = mine[leaf]
            if theirs.get(leaf) is not value:
                theirs[leaf] = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            self._sync()
            return self.__dict__["graph_module"](*args, **kwargs)
        return self.__dict__["_eval_forward"](*args, **kwargs)

    def extra_repr(self) -> str:
        report = self.meta["bnrewrite"]
        count = getattr(report, "count", None)
        if count is None:
            count = len(getattr(getattr(report, "bn", None), "rewritten", []))
        return f"captured {self.__dict__['_model_name']} with torch.export; {count} BatchNorm rewritten"


def _has_tensor(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    try:
        mod = module.get_submodule(owner) if owner else module
    except AttributeError:
        return False
    return leaf in mod._parameters or leaf in mod._buffers
