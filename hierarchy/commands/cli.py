"""The ``hierarchy`` command line. Commands are thin: parse, call the library, render.

Each command lives in ``hierarchy/commands/<name>.py`` with ``add_parser(subparsers)``; heavy
libraries (torch, torchvision, matplotlib) are imported only inside the command that needs them,
so ``hierarchy --help`` and ``hierarchy validate`` stay fast.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
from typing import NoReturn, Sequence

from hierarchy import __version__
from hierarchy.core.errors import ConfigError, HierarchyError
from hierarchy.core.perf import tune_for_command
from hierarchy.core.phases import phase, report

FAST_EXIT_ENV = "HIERARCHY_FAST_EXIT"
COMMANDS = ("run", "validate", "stages", "build_dataset", "train", "evaluate", "calibrate", "export", "demo",
            "new_stage", "card", "bundle", "weights", "serve", "tune")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv`` naming a command, only that command's module is imported (a start
    of ``hierarchy run`` does not pay for importing the fourteen others)."""
    parser = argparse.ArgumentParser(
        prog="hierarchy", description="Hierarchical image classification: chain classifier stages, "
        "route each image by predicted label, abstain when unsure.")
    parser.add_argument("--version", action="version", version=f"hierarchy {__version__}")
    add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = _command_in(argv)
    for name in (named,) if named else COMMANDS:
        try:
            module = importlib.import_module(f"hierarchy.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"hierarchy.commands.{name}":
                raise
            continue  # command not built into this version
        module.add_parser(sub)
    for command in dict.fromkeys(sub.choices.values()):  # `hierarchy run -q ...` as well as `hierarchy -q run ...`
        add_global_flags(command, top=False)
    return parser


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The module of the command ``argv`` names (its first word that is not a global flag), if any."""
    for word in argv or ():
        if word in ("-v", "-vv", "-vvv", "--verbose", "-q", "--quiet"):
            continue
        name = word.replace("-", "_")
        return name if name in COMMANDS else None
    return None


def add_global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q, accepted before and after the subcommand (a subcommand's copy defaults to SUPPRESS, so
    it only overrides what was given before the subcommand when given itself)."""
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="more logging on stderr")
    parser.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="only warnings and errors on stderr")


def main(argv: Sequence[str] | None = None) -> int:
    with phase("parse arguments"):
        words = sys.argv[1:] if argv is None else argv
        parser = build_parser(words)
        args = parser.parse_args(words)
    args.argv = list(words)  # `train --nproc-per-node` relaunches it
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    tune_for_command(args.command)  # allocator thresholds, before torch allocates anything
    try:
        with phase(f"command {args.command}"):
            return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HierarchyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # `hierarchy run ... | head` is normal use
    finally:
        report()  # $HIERARCHY_PHASES: where the time went, on stderr


def entry() -> NoReturn:
    """The ``hierarchy`` console script and ``python -m hierarchy``: :func:`main`, then an exit that
    skips tearing the interpreter down (freeing every module, and onnxruntime's or OpenVINO's thread
    pools, costs 80-130 ms after a one-image run) once all that exit must do is done: non-daemon
    threads are joined and atexit handlers run before it (Python runs them last-registered first,
    and this one is registered before any but logging's), then logging and the standard streams are
    flushed. ``HIERARCHY_FAST_EXIT=off`` exits the usual way."""
    outcome: list[int | str | None] = [1]  # an uncaught exception: its traceback is printed, then exit 1
    if os.environ.get(FAST_EXIT_ENV, "").strip().lower() not in ("off", "0", "false", "no"):
        atexit.register(_exit_without_teardown, outcome)
    try:
        outcome[0] = main()
    except SystemExit as exc:  # argparse's usage errors and --help
        outcome[0] = exc.code
        raise
    raise SystemExit(outcome[0])


def _exit_without_teardown(outcome: list[int | str | None]) -> None:
    code = outcome[0]
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to lose
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    entry()
