"""bnrewrite for ONNX: train-mode export and the ``BatchNormalization`` rewrite.

``rewrite(model, config)`` replaces every training-mode ``BatchNormalization`` of an ONNX model by
the sampled-estimation subgraph of :mod:`bnrewrite.passes.onnx_sampled_batchnorm` (standard ONNX
ops; the math of :func:`bnrewrite.sampled_batch_norm`, the sample set of
:func:`bnrewrite.plan.sample_plan`). ``export(model, args, f, config)`` exports a torch module in
training mode with its BatchNorm kept as training BN, and rewrites it when a config is given.

Pipeline of ``rewrite``: (1) inline the model-local functions that contain a
``BatchNormalization`` (function bodies carry no shapes), (2) ONNX shape inference (the rule needs
static input shapes), (3) the rule set, one rule per output count, on the main graph and every
control-flow subgraph, (4) removal of the nodes nobody reads any more (running statistics that
were dangling outputs of the old node). See ``docs/onnx.md``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import IO, Any, TypeVar

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from ..config import SamplingConfig
from ..passes.onnx_sampled_batchnorm import (
    RewriteReport,
    sampled_batchnorm_rules,
)

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "RewriteReport",
    "declare_running_stats_outputs",
    "export",
    "rewrite",
    "rewrite_with_report",
    "output_directory",
    "umask_mode",
    "write_model_atomic",
]

logger = logging.getLogger(__name__)

#: Opset of ``export``: 14+ has ``BatchNormalization(training_mode=1)`` with three outputs.
DEFAULT_OPSET = 17

ModelT = TypeVar("ModelT", onnx.ModelProto, ir.Model)


def _coerce_config(config: Any) -> SamplingConfig:
    return SamplingConfig.coerce(config)


def _batchnorm_names(proto: onnx.ModelProto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]


def _rewrite_vdn(
    proto: onnx.ModelProto, cfg: SamplingConfig
) -> tuple[onnx.ModelProto, RewriteReport]:
    """VDN / FS+VDN: a whole-graph rewrite (:mod:`bnrewrite.passes.onnx_vdn`); BN counted by name."""
    from ..passes.onnx_vdn import rewrite_vdn_onnx

    out = rewrite_vdn_onnx(onnx.shape_inference.infer_shapes(proto), cfg)
    left = set(_batchnorm_names(out))
    report = RewriteReport()
    for name in _batchnorm_names(proto):
        if name in left:
            report.skipped.append((name, "inference mode (training_mode=0)"))
        else:
            report.rewritten.append(name)
    logger.info("bnrewrite.onnx (%s): %s", cfg.method, report.summary())
    return out, report


def _has_batchnorm(function: ir.Function) -> bool:
    return any(
        node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
        for node in ir.traversal.RecursiveGraphIterator(function)
    )


def _rewrite_ir(
    model: ir.Model, cfg: SamplingConfig, overrides: Mapping[str, Any] | None = None
) -> RewriteReport:
    if any(_has_batchnorm(f) for f in model.functions.values()):
        ir_common.InlinePass(criteria=_has_batchnorm)(model)
    ir_common.ShapeInferencePass(strict_mode=False)(model)
    report = RewriteReport()
    if sampled_batchnorm_rules(cfg, report, overrides=overrides).apply_to_model(model):
        # Running statistics nobody reads (the exporter leaves them dangling) and their inputs
        # are dead code now: drop them. Declared or used ones are kept under their names.
        ir_common.RemoveUnusedNodesPass()(model)
        _trim_copied_provenance(model)
    logger.info("bnrewrite.onnx: %s", report.summary())
    return report


#: Per-node provenance that torch's exporter writes (stack trace, module path, FX node) and
#: onnxscript's rewriter copies onto every node a rule creates: ~0.9 kB a node, and a BN becomes
#: 15-40 nodes (3x the file size). One copy is enough: the first node of each replacement keeps
#: it, the others keep the rule's name only.
_RULE_NAME = "pkg.onnxscript.rewriter.rule_name"


def _trim_copied_provenance(model: ir.Model) -> None:
    seen: set[tuple[tuple[str, str], ...]] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        props = node.metadata_props
        if _RULE_NAME not in props:
            continue
        key = tuple(sorted((k, v) for k, v in props.items() if k != _RULE_NAME))
        if key in seen:
            for k in [k for k in props if k != _RULE_NAME]:
                del props[k]
        seen.add(key)


def rewrite_with_report(
    model: ModelT,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[ModelT, RewriteReport]:
    """``rewrite`` that also returns the report (rewritten node names, skipped nodes and why)."""
    cfg = _coerce_config(config)
    if cfg.uses_virtual_rows and overrides:
        raise ValueError(
            "overrides apply per BatchNormalization node; VDN rewrites the whole graph with one "
            "config -- drop overrides or use a per-node method (bs, fs, ns, full)"
        )
    if (
        cfg.uses_virtual_rows
    ):  # whole-graph rewrite on the proto; an ir.Model comes back as a new one
        if isinstance(model, ir.Model):
            out, report = _rewrite_vdn(ir.serde.serialize_model(model), cfg)
            return ir.serde.deserialize_model(out), report
        if isinstance(model, onnx.ModelProto):
            return _rewrite_vdn(model, cfg)
    if isinstance(model, onnx.ModelProto):
        model_ir = ir.serde.deserialize_model(model)
        report = _rewrite_ir(model_ir, cfg, overrides)
        return ir.serde.serialize_model(model_ir), report
    if isinstance(model, ir.Model):
        return model, _rewrite_ir(model, cfg, overrides)
    raise ValueError(
        f"model must be an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__}"
    )


def rewrite(
    model: ModelT,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> ModelT:
    """Rewrite every training-mode ``BatchNormalization`` of ``model`` with sampled statistics.

    Takes an ``onnx.ModelProto`` (not modified; a new proto is returned) or an ``onnx_ir.Model``
    (rewritten in place and returned). Inference BN is left alone; nodes that cannot be rewritten
    (dynamic shapes, ...) are skipped and logged -- use :func:`rewrite_with_report` to get them.
    ``overrides``: ``{name or pattern: config or None}`` per node, matched against the node's name
    and the module path the exporter recorded (``"layer1.0.bn1"``), e.g. an automatic budget
    (:func:`bnrewrite.budget.load_overrides`).
    """
    return rewrite_with_report(model, config, overrides=overrides)[0]


@contextlib.contextmanager
def _training_mode_preserved(module: Any):
    """Export in train mode, then restore the modes and every buffer the trace updated.

    A module in eval mode is switched to train mode as a whole; a module already in train mode is
    exported as it is, so that a BN the user put in eval mode inside it stays inference BN.
    """
    import torch

    modes = {name: sub.training for name, sub in module.named_modules()}
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    if not module.training:
        module.train()
    try:
        yield saved
    finally:
        for name, sub in module.named_modules():
            sub.training = modes.get(name, sub.training)
        with torch.no_grad():
            for name, buf in module.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])


def _restore_initializers(proto: onnx.ModelProto, saved: Mapping[str, Any]) -> None:
    """The trace ran one training step: put the pre-export buffer values back into the model."""
    for index, init in enumerate(proto.graph.initializer):
        if init.name in saved:
            array = saved[init.name].cpu().numpy()
            proto.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(array, init.name))


def declare_running_stats_outputs(proto: onnx.ModelProto) -> list[str]:
    """Declare the running-statistics outputs of every training BN of the main graph as graph
    outputs (type and shape from the running-statistics inputs). Returns their names."""
    declared = {o.name for o in proto.graph.output}
    types = {v.name: v for v in [*proto.graph.input, *proto.graph.value_info]}
    inits = {i.name: i for i in proto.graph.initializer}
    names: list[str] = []
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        for out, src in zip(node.output[1:3], node.input[3:5]):
            if not out or out in declared:
                continue
            if src in inits:
                info = onnx.helper.make_tensor_value_info(
                    out, inits[src].data_type, list(inits[src].dims)
                )
            elif src in types:
                info = onnx.helper.ValueInfoProto()
                info.CopyFrom(types[src])
                info.name = out
            else:
                info = onnx.helper.make_empty_tensor_value_info(out)
            proto.graph.output.append(info)
            declared.add(out)
            names.append(out)
    return names


def output_directory(path: str | os.PathLike[str]) -> str:
    """The existing directory ``path`` will be written into; else ``FileNotFoundError`` naming
    the user's path (not the temporary file beside it)."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"cannot write {os.fspath(path)}: the directory {directory} does not exist"
        )
    return directory


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` under the process's umask: what ``open(path, "w")`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_model_atomic(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``proto`` to ``path`` through a temporary file in the same directory (no partial file).

    The file gets the permissions of any file the user writes (``0666`` under the umask), not the
    ``0600`` of the temporary file."""
    path = os.fspath(path)
    directory = output_directory(path)
    fd, tmp = tempfile.mkstemp(prefix=".bnrewrite-", suffix=".onnx.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(proto.SerializeToString())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: ``export(exporter=...)``: ``"auto"`` (the torch.export-based exporter, falling back to the
#: TorchScript one where it cannot export the model), ``"dynamo"`` or ``"torchscript"``.
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")


def _export_dynamo(
    model: Any, args: tuple[Any, ...], opset: int, input_names: Any, output_names: Any
) -> onnx.ModelProto:
    """torch's supported exporter (``dynamo=True``), training BN kept by our translation table."""
    import torch

    from ._dynamo_export import translations

    stderr = io.StringIO()  # torch.export prints a failing graph there; the error says why
    with warnings.catch_warnings(), _quiet_torch_onnx(), contextlib.redirect_stderr(stderr):
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            custom_translation_table=translations(),
            optimize=False,  # the optimiser folds a training BN into the Conv before we see it
            opset_version=max(opset, 18),
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
            verbose=False,
        )
    # Fold the constant subgraphs the exporter leaves (reduction axes built by Reshape, casts of
    # literals) and nothing else: the full optimiser would fold a training BN into its Conv.
    from onnxscript.optimizer import fold_constants

    model_ir = ir.serde.deserialize_model(program.model_proto)
    fold_constants(model_ir)
    ir_common.RemoveUnusedNodesPass()(model_ir)
    return ir.serde.serialize_model(model_ir)


@contextlib.contextmanager
def _quiet_torch_onnx():
    """torch.onnx logs its progress on the root handlers at WARNING; keep the user's log clean."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _has_torchscript_exporter() -> bool:
    import torch

    return hasattr(torch.onnx, "TrainingMode") and hasattr(torch.jit, "TracerWarning")


def _export_torchscript(
    model: Any, args: tuple[Any, ...], opset: int, input_names: Any, output_names: Any
) -> onnx.ModelProto:
    """torch's deprecated TorchScript exporter (``dynamo=False``), kept while torch has it."""
    import torch

    if not _has_torchscript_exporter():
        raise ValueError(
            "exporter='torchscript': this torch has no TorchScript ONNX exporter; use "
            "exporter='dynamo' (the torch.export-based route)"
        )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated and warns about it; keep the user's log clean.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            args,
            buffer,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,  # train mode set by the context
            do_constant_folding=False,
            opset_version=opset,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
        )
    return onnx.load_from_string(buffer.getvalue())


def _as_plain_batch_norm(model: Any) -> tuple[Any, list[SamplingConfig]]:
    """A model converted with ``convert_`` is exported as PyTorch's BatchNorm (sharing its
    parameters and buffers) and rewritten by the ONNX rule, as an unconverted one is: the sampled
    layers' torch code is not an ONNX training BatchNormalization. Returns the configs found."""
    import torch

    from ..modules import SampledBatchNormMixin, plain_twins

    if not isinstance(model, torch.nn.Module) or not any(
        isinstance(m, SampledBatchNormMixin) for m in model.modules()
    ):
        return model, []
    return plain_twins(model)


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0] if text else type(error).__name__


def export(
    model: Any,
    args: Any,
    f: str | os.PathLike[str] | IO[bytes],
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    running_stats_outputs: bool = False,
    exporter: str = "auto",
) -> onnx.ModelProto:
    """Export ``model`` in training mode with training ``BatchNormalization``, rewritten if ``config``.

    ``exporter`` (:data:`EXPORTERS`): ``"dynamo"`` is torch's supported, ``torch.export``-based
    exporter with a translation table that keeps training BN (:mod:`._dynamo_export`; torch's own
    table emits inference BN), at opset ``max(opset, 18)``; ``"torchscript"`` is torch's
    deprecated TorchScript exporter (``dynamo=False``, no constant folding), at ``opset``;
    ``"auto"`` (default) uses ``"dynamo"`` and falls back, with a warning that says why, to
    ``"torchscript"`` for a model ``torch.export`` cannot capture (e.g. ``BatchNorm(momentum=None)``,
    whose factor depends on a buffer's value). Both give the same ONNX semantics (docs/onnx.md).

    A module in eval mode is put in train mode for the export; in a module already in train
    mode, BN layers the user set to eval mode stay inference BN and the rewrite leaves them alone.
    Modes and buffers are restored afterwards and the exported running statistics are the values
    from before the call (the TorchScript exporter runs the module once). ``f`` is a path (written
    atomically) or a binary file object. Returns the written ``ModelProto``.

    A model converted with :func:`bnrewrite.convert_` exports the same way (its layers are seen as
    PyTorch's BatchNorm and rewritten by the ONNX rule); without ``config`` it takes the config
    the layers were converted with.

    The exporter leaves the updated running statistics of each BN as unused node outputs;
    ``running_stats_outputs=True`` declares them as graph outputs (after the model's outputs, two
    per BN in graph order: running mean, running variance), so that a runtime returns them.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(
            f"exporter must be one of {', '.join(map(repr, EXPORTERS))}, got {exporter!r}"
        )
    cfg = None if config is None else _coerce_config(config)
    if isinstance(args, torch.Tensor):
        args = (args,)
    args = tuple(args)
    names = (input_names, output_names)
    model, converted = _as_plain_batch_norm(model)
    if converted and cfg is None:
        if len(set(converted)) > 1:
            raise ValueError(
                "the model's BatchNorm layers were converted with different configs; pass "
                "config= to export (one config for every layer)"
            )
        cfg = converted[0]
    with _training_mode_preserved(model) as saved:
        if exporter == "torchscript":
            proto = _export_torchscript(model, args, opset, *names)
        else:
            try:
                proto = _export_dynamo(model, args, opset, *names)
            except torch.onnx.OnnxExporterError as e:
                why = _first_line(e)
                if exporter == "dynamo" or not _has_torchscript_exporter():
                    raise ValueError(
                        f"the torch.export-based ONNX exporter cannot export this model ({why}); "
                        f"make the model exportable with torch.export, or pass "
                        f"exporter='torchscript' while torch still has that exporter"
                    ) from e
                warnings.warn(
                    f"bnrewrite.onnx.export: the torch.export-based exporter cannot export this "
                    f"model ({why}); used the TorchScript exporter instead",
                    UserWarning,
                    stacklevel=2,
                )
                proto = _export_torchscript(model, args, opset, *names)
    _restore_initializers(proto, saved)
    if running_stats_outputs:
        declare_running_stats_outputs(proto)
    if cfg is not None:
        proto, report = rewrite_with_report(proto, cfg)
        logger.info("bnrewrite.onnx.export: %s", report.summary())
    if isinstance(f, (str, os.PathLike)):
        write_model_atomic(proto, f)
    else:
        f.write(proto.SerializeToString())
    return proto
