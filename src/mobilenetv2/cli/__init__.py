"""The ``mobilenetv2`` command line: one subcommand per task.

Each subcommand lives in a small module of this package that registers its parser and a
function taking the parsed arguments; the library functions underneath take typed arguments
and dataclasses, never an ``argparse.Namespace``.

User mistakes (a missing file, a bad argument, weights that do not fit) end in one line on
stderr and exit code 2; a run that fails on its own (the loss diverged, the disk is full) in
one line and exit code 1; no traceback.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import difflib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..engine import NonFiniteLossError
from ..reporting import stderr_log_lines, version_text
from . import deploy, predict, summary, train
from .common import missing_package_message, one_line

# Each module has ``register(subparsers)``; the order here is the order of ``--help``.
COMMAND_MODULES = [train, predict, deploy, summary]


class VersionAction(argparse.Action):
    """``--version``: argparse's, with the versions and platform a bug report needs after the
    first line (``mobilenetv2 X.Y.Z``, as before), gathered only when asked for."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        print(version_text())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """An argument error is one line, as every other user error (not the whole usage), with
    the closest spelling of a mistyped option or choice (as git's "did you mean")."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # Kept for error(): a misspelled option is left over, unnamed, when argparse stops
        # first at a required one ("--wieghts w" -> "the following arguments are required").
        self._arg_strings = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self.suggestion(message)} "
                     f"(for usage: {self.prog} -h)\n")

    def suggestion(self, message: str) -> str:
        """``; did you mean --epochs?`` for a mistyped option or choice, else ``""``."""
        choice = re.match(r"argument [^:]+: invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if choice:
            choices = re.findall(r"'([^']*)'", choice[2]) or choice[2].split(", ")
            close = difflib.get_close_matches(choice[1], choices, n=1, cutoff=0.6)
            return f"; did you mean '{close[0]}'?" if close else ""
        known = [o for action in self._actions for o in action.option_strings]
        if message.startswith("unrecognized arguments: "):
            typed = message.removeprefix("unrecognized arguments: ").split()
        elif message.startswith("the following arguments are required: "):
            typed = getattr(self, "_arg_strings", [])
        else:
            return ""
        mistakes = [t.split("=", 1)[0] for t in typed if t.startswith("--")]
        pairs = [(t, difflib.get_close_matches(t, known, n=1, cutoff=0.75))
                 for t in mistakes if t not in known]
        hints = [f"{typo}: did you mean {close[0]}?" for typo, close in pairs if close]
        return f"; {'; '.join(hints)}" if hints else ""


# What `mobilenetv2 -h` ends with (clig.dev: lead with examples; say what the exit codes mean).
EPILOG = """\
examples:
  mobilenetv2 train            # the built-in digits, in 1-2 minutes
  mobilenetv2 eval --weights runs/DIR/best.safetensors
  mobilenetv2 predict --weights runs/DIR/best.safetensors photo.jpg photos/
  mobilenetv2 export --weights runs/DIR/best.safetensors --out model.onnx
  mobilenetv2 COMMAND -h       # a command's options and their defaults

Results go to stdout (with --json: one JSON object), progress and errors to
stderr. Exit codes: 0 done; 1 the run failed (the loss diverged, a full disk,
out of memory); 2 a mistake in the arguments or files (one line says which);
128+N stopped by signal N (130: Ctrl-C; train saves a checkpoint first).
More: docs/reliability.md
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mobilenetv2",
        description="MobileNetV2 (Sandler et al., 2018): train, evaluate, predict, export,\n"
        "quantize and benchmark.",  # (a raw formatter: the examples keep their lines)
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction, nargs=0,
                        help="show the version, and torch's, torchvision's, Python's, the platform "
                        "and the git commit of a checkout (what a bug report needs), and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def _out_of_memory(error: RuntimeError) -> bool:
    """torch's allocation failures: CPU (DefaultCPUAllocator) and CUDA (OutOfMemoryError)."""
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _escape_what_stdout_cannot_encode() -> None:
    """Print the characters stdout's encoding cannot spell as escapes (``\\u732b``), as
    Python's stderr always does, instead of failing halfway through the output: Windows gives
    a redirected stdout (``> out.txt``, a pipe) its ANSI code page, and cp1252 has no CJK,
    Cyrillic or Greek for the class names and paths that predict and eval print."""
    stream = sys.stdout
    with contextlib.suppress(AttributeError, LookupError, ValueError, OSError):
        if stream.errors == "strict" and codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors="backslashreplace")


def stderr_logging() -> contextlib.AbstractContextManager[None]:
    """Log lines (INFO and above) on stderr, as bare messages, for the length of a command.

    The root logger's handlers and level are put back afterwards, unclosed: ``main`` called
    from a notebook or an application leaves their logging as it found it (``basicConfig(
    force=True)`` replaced their handlers, closing a log file's, and left the level at INFO).
    """
    return stderr_log_lines(logging.getLogger(), replace=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (argparse's own refusals, ``-h`` and
    ``--version`` raise ``SystemExit``, as argparse does)."""
    _escape_what_stdout_cannot_encode()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's own line and usage hint, not the top-level parser's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    with stderr_logging():  # put back as it was when main returns: a notebook's is its own
        try:
            return int(args.func(args) or 0)
        except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                PermissionError) as e:
            print(f"mobilenetv2 {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # stdout closed early (| head): end quietly, as Unix tools do
            with contextlib.suppress(OSError, ValueError):  # and no error at exit's flush
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + getattr(signal, "SIGPIPE", 13)  # (Windows has no SIGPIPE: its number)
        except (NonFiniteLossError, OSError) as e:  # not the arguments: the run itself failed
            print(f"mobilenetv2 {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 1
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and not _out_of_memory(e):
                raise
            print(f"mobilenetv2 {args.command}: error: out of memory ({one_line(e)[:200]}): lower "
                  "the batch size or the resolution (--batch-size, --resolution)", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:  # Ctrl-C, or a second SIGTERM/SIGINT during training
            signum = getattr(e, "signum", signal.SIGINT)
            by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            print(f"mobilenetv2 {args.command}: interrupted{by}", file=sys.stderr)
            return 128 + signum
        except ModuleNotFoundError as e:  # an optional extra not installed: say which
            message = missing_package_message(e.name or "")
            if message is None:
                raise
            print(f"mobilenetv2 {args.command}: error: {message}", file=sys.stderr)
            return 2
