"""``bnrewrite onnx IN.onnx OUT.onnx --method fs --ratio 1/16 [--sampling fixed] [--seed N]
[--overrides BUDGET.json]``.

Reads an ONNX model (external data files next to it are read too), rewrites its training-mode
``BatchNormalization`` nodes (:func:`bnrewrite.onnx.rewrite_with_report`), checks the result with
``onnx.checker`` and writes it atomically: a temporary file in the output directory, then
``os.replace``. A model whose tensors were stored as external data is written the same way, with
its data in ``OUT.onnx.data``. Prints one summary line. Every user error -- missing or unreadable
file, no training BN, bad option -- is one line on stderr and exit status 2, with no output file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile

import onnx
from onnx import external_data_helper

from ..cli import CLIError, add_sampling_arguments, config_from_args
from . import output_directory, rewrite_with_report, umask_mode

__all__ = ["HELP", "add_arguments", "run"]

HELP = "rewrite the training-mode BatchNormalization of an ONNX model with sampled statistics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.onnx", help="ONNX model with training-mode BN")
    parser.add_argument("output", metavar="OUT.onnx", help="where to write the rewritten model")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--overrides",
        metavar="FILE.json",
        default=None,
        help="per-layer configs: a file from `bnrewrite budget` or {layer: config} (module paths "
        "or node names)",
    )


def _load(path: str) -> tuple[onnx.ModelProto, bool]:
    """The model with its external data loaded, and whether it had external data."""
    if not os.path.isfile(path):
        raise CLIError(f"input file not found: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise CLIError(f"cannot read {path} as an ONNX model ({type(e).__name__})") from None
    external = any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    try:
        if external:
            external_data_helper.load_external_data_for_model(
                proto, os.path.dirname(os.path.abspath(path))
            )
        onnx.checker.check_model(proto)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"{path} is not a valid ONNX model: {first}") from None
    return proto, external


def _save(proto: onnx.ModelProto, path: str, external: bool) -> None:
    """Write into a temporary directory beside ``path``, then move the files into place."""
    directory = output_directory(path)
    name = os.path.basename(path)
    tmpdir = tempfile.mkdtemp(prefix=".bnrewrite-", dir=directory)
    try:
        tmp = os.path.join(tmpdir, name)
        if external:
            onnx.save_model(
                proto,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=name + ".data",
                size_threshold=1024,
            )
            if os.path.exists(tmp + ".data"):
                os.chmod(tmp + ".data", umask_mode())
                os.replace(tmp + ".data", path + ".data")
        else:
            onnx.save_model(proto, tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmpdir)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # bad method / ratio: ValueError, one line
    overrides = None
    if args.overrides is not None:
        from ..budget import load_overrides

        overrides = load_overrides(args.overrides)  # bad file: ValueError, one line
    proto, external = _load(args.input)
    rewritten, report = rewrite_with_report(proto, config, overrides=overrides)
    if not report.rewritten:
        if report.skipped:
            reasons = "; ".join(f"{n}: {why}" for n, why in report.skipped)
            raise CLIError(
                f"no training-mode BatchNormalization rewritten in {args.input}: {reasons}"
            )
        raise CLIError(f"{args.input} has no BatchNormalization node to rewrite")
    try:
        onnx.checker.check_model(rewritten, full_check=True)
    except Exception as e:  # a bug of ours, but still one line for the user
        raise CLIError(f"rewritten model failed onnx.checker: {str(e).splitlines()[0]}") from None
    _save(rewritten, args.output, external)
    print(f"bnrewrite onnx: {report.summary()} -> {args.output}")
    return 0
