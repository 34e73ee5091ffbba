"""The ``bnrewrite`` command line (also ``python -m bnrewrite``).

Subcommands register themselves in ``COMMANDS``: each is ``(help, add_arguments, run)``. Errors a
user can fix (bad file, bad option) are raised as ``CLIError`` or ``ValueError`` and printed as one
line on stderr with exit status 2 -- never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["CLIError", "CommandImportError", "main", "add_sampling_arguments", "config_from_args"]


class CLIError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def add_sampling_arguments(p: argparse.ArgumentParser, method_default: str | None = None) -> None:
    """The SamplingConfig flags shared by every subcommand that rewrites."""
    p.add_argument("--method", default=method_default, help="full, ns, bs, fs, vdn or fs_vdn")
    p.add_argument("--ratio", default=None, help="fraction such as 0.125 or 1/8")
    p.add_argument("--groups", type=int, default=None, help="channel groups sampling independently")
    p.add_argument("--sampling", default="random", help="random (default) or fixed")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible random sampling")
    p.add_argument(
        "--vdn-samples", type=int, default=None, help="virtual rows for vdn / fs_vdn (at least 2)"
    )
    p.add_argument(
        "--vdn-per-row",
        type=float,
        default=None,
        help="virtual rows per real row at least (default 0.25 for vdn: max(2, ceil(N/4)))",
    )
    p.add_argument(
        "--vdn-min-rows",
        type=int,
        default=None,
        help="real + virtual rows at least (default 6 for fs_vdn: max(2, 6 - N) virtual)",
    )
    p.add_argument(
        "--min-count", type=int, default=None, help="floor: values per channel at least (32)"
    )


def config_from_args(args: argparse.Namespace):  # -> SamplingConfig
    from .config import SamplingConfig

    if args.method is None:
        raise CLIError("--method is required (full, ns, bs, fs, vdn or fs_vdn)")
    return SamplingConfig(
        method=args.method,
        ratio=args.ratio,
        groups=args.groups,
        sampling=args.sampling,
        seed=args.seed,
        vdn_samples=args.vdn_samples,
        min_count=getattr(args, "min_count", None),
        vdn_per_row=getattr(args, "vdn_per_row", None),
        vdn_min_rows=getattr(args, "vdn_min_rows", None),
    )


# name -> (module defining ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``; short help).
# Only the module of the command being run is imported, so ``bnrewrite onnx`` does not pay for
# matplotlib or triton.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("bnrewrite.apps.demo", "train BN vs every sampling method on embedded real data"),
    "diagnose": ("bnrewrite.apps.diagnose", "per-layer estimation error of each method"),
    "budget": ("bnrewrite.apps.budget", "per-layer sample budget from an error target, as JSON"),
    "bench": ("bnrewrite.apps.bench", "benchmark table: sampled BN vs cuDNN vs torch.compile"),
    "onnx": ("bnrewrite.onnx.cli", "rewrite the training BatchNormalization of an ONNX model"),
}


class CommandImportError(Exception):
    """The module of a subcommand failed to import: a broken install, not a user error."""


def _load(name: str):
    module = COMMANDS[name][0]
    try:
        return importlib.import_module(module)
    except ImportError as e:  # reported as what it is, never as an unknown command
        raise CommandImportError(
            f"bnrewrite {name}: cannot import {module}: {type(e).__name__}: {e}"
        ) from e


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"bnrewrite: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (for its arguments)."""
    parser = _Parser(prog="bnrewrite", description="BatchNorm with sampled statistics.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, short) in COMMANDS.items():
        mod = _load(name) if name == command else None
        help_text = getattr(mod, "HELP", short)
        p = sub.add_parser(name, help=short, description=help_text)
        if mod is not None:
            mod.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        mod = _load(args.command)
    except CommandImportError as e:
        print(f"{e} (a broken installation: reinstall bnrewrite)", file=sys.stderr)
        return 1
    run: Callable[[argparse.Namespace], int] = mod.run
    try:
        return int(run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"bnrewrite {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnrewrite: interrupted", file=sys.stderr)
        return 130
