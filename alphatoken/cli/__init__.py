"""The `alphatoken` console script.

    alphatoken demo  [--steps N] [--out DIR]           every token vs AlphaToken on the built-in tiny model + data
    alphatoken score DATA.jsonl [--model DIR|builtin]  value a dataset; write values, masks and the HTML report
    alphatoken train [--config run.yaml] [flags]       SFT or DPO with AlphaToken; checkpoints; --resume
    alphatoken bench [--quick] [--cpu]                 the kernel benchmarks, as a table

Bad input ends with one line on stderr (`alphatoken: error: ...`) and exit status 2; any other failure with
one line and status 1 (`ALPHATOKEN_DEBUG=1` shows the traceback). Every setting is checked before any work (no
model load, no Fisher, no file written on bad input). Outputs are written to temporary paths and renamed into
place when complete: score's set of files as one folder swap, train's checkpoints each as one folder, with a
sha256 of every file checked by --resume. Progress bars go to stderr when it is a terminal (`--quiet` turns them off).

Layout: `parser` builds the argument parser; `config_flags` generates one flag per AlphaTokenConfig field; `demo`, `score`, `train` and `bench` hold one command each; `shared`
holds what several commands use; this module runs a command and turns its failures into the one-line errors.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ..errors import UserError
from .bench import _find_bench_script, cmd_bench
from .demo import cmd_demo
from .parser import DEFAULT_OUT, PROG, build_parser
from .score import cmd_score
from .shared import RunError
from .train import RESUME_MAY_CHANGE, TRAIN_DEFAULTS, cmd_train

__all__ = ["main", "build_parser", "cmd_demo", "cmd_score", "cmd_train", "cmd_bench", "TRAIN_DEFAULTS",
           "RESUME_MAY_CHANGE", "DEFAULT_OUT", "PROG", "_find_bench_script"]


def _quiet_transformers() -> None:
    """transformers' own bars (weight loading) follow our rule: only on a terminal, never with --quiet."""
    from ..progress import progress_enabled

    if progress_enabled():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing or very old
        pass


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse already printed
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    import contextlib

    from ..progress import forced_progress

    with forced_progress(False) if getattr(args, "quiet", False) else contextlib.nullcontext():
        return _run_command(args)


def _run_command(args) -> int:
    """Run the parsed command: its exit status, every failure reported on one line (UserError: 2, others: 1)."""
    debug = os.environ.get("ALPHATOKEN_DEBUG", "") not in ("", "0")
    import warnings

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{PROG}: warning: {_one_line(message if isinstance(message, Warning) else Warning(message))}",
              file=sys.stderr)

    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = one_line_warning
            if args.command != "bench":
                _quiet_transformers()
            return int(args.func(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return UserError.exit_code
    except RunError as err:  # not bad input, but one line naming the file and the cause (a full disk, ...)
        if debug:
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return RunError.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # not the user's input: still one line, with the way to the traceback
        if debug:
            raise
        where = f"{err.filename}: " if isinstance(err, OSError) and getattr(err, "filename", None) else ""
        print(f"{PROG}: error: {where}{type(err).__name__}: {_one_line(err)} "
              f"(set ALPHATOKEN_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1

