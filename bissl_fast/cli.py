"""Console entry point ``bissl-fast`` (also ``python -m bissl_fast``): ``bench`` (benchmark report), ``demo``
(the honest BiSSL experiment) and ``run`` (the paper's pipeline).

Every error ends the command with one line on stderr and exit code 2; ``--debug``, before or after
the command, shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

_PROG = "bissl-fast"
_USAGE_ERROR = 2
# What `bissl-fast --help` says (plain text: the module docstring is reStructuredText).
_DESCRIPTION = """\
bench (benchmark report), demo (the honest BiSSL experiment) and run (the paper's pipeline).

Every error ends the command with one line on stderr and exit code 2; --debug, before or after
the command, shows the full traceback instead."""
# Commands that take --debug themselves (those that catch their own errors); for the others it is the CLI's alone.
_OWN_DEBUG = {"run"}


class _UsageError(Exception):
    """A command line that argparse rejected."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench.report import DEFAULT_SUITE_DIR, run_bench

    return run_bench(args.out, args.suite_dir or DEFAULT_SUITE_DIR, args.select, args.device, args.max_time,
                     args.threads, args.update_readme, quick=args.quick)


def _version() -> str:
    import torch

    from . import __version__

    return f"{_PROG} {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def _parser() -> _Parser:
    parser = _Parser(prog=_PROG, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback (also after the command)")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help="run the benchmark suites for this device and write a report")
    bench.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (JSON, Markdown, PNG)")
    bench.add_argument("--suite-dir", type=Path, default=None, help="folder holding bench_*.py (default: the suites shipped in bissl_fast/bench/suites)")
    bench.add_argument("--select", default=None, metavar="NAMES", help="only the suites whose name contains one of these comma-separated names, e.g. byol,nt_xent")
    bench.add_argument("--quick", action="store_true", help="one size per op, fewer rounds, no per-layer profile (a few minutes on 2 CPU cores)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--max-time", type=float, default=None, help="seconds of timing per benchmark (pytest-benchmark max_time; default 1, with --quick 0.25)")
    bench.add_argument("--threads", type=int, default=1, help="intra-op threads for every suite (default 1: steady on a shared machine; the cores of an idle one to publish)")
    bench.add_argument("--update-readme", type=Path, default=None, help="then regenerate this README's benchmark block from the results")
    bench.set_defaults(run=_bench)
    # Commands that parse their own arguments: "module:function" called with the rest of the line.
    sub.add_parser("demo", help="replicated experiment: BiSSL vs compute-matched continued pretext training, with statistics", add_help=False).set_defaults(entry="bissl_fast.experiments.demo:main")
    sub.add_parser("run", help="the paper's pipeline: checkpoint -> head warm-up -> BiSSL -> fine-tuning", add_help=False).set_defaults(entry="bissl_fast.experiments.pipeline:main")
    return parser


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    entry = getattr(args, "entry", None)
    if entry is None:
        if rest:
            raise _UsageError(f"unrecognized arguments: {' '.join(rest)} (see {_PROG} {args.command} --help)")
        return int(args.run(args, rest) or 0)
    if args.debug and args.command in _OWN_DEBUG:
        rest = [*rest, "--debug"]
    module, function = entry.split(":")
    return int(getattr(importlib.import_module(module), function)(rest) or 0)


def _split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere before a ``--`` (before or after the command), and the arguments without it."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return len(kept) < len(argv), kept


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    # These carry their meaning in the message; for others (KeyError 'x', ...) the type is the news.
    if message and isinstance(exc, (OSError, ValueError, TypeError, RuntimeError)):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``bissl-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    debug, argv = _split_debug(sys.argv[1:] if argv is None else list(argv))
    try:
        args, rest = _parser().parse_known_args(argv)
        args.debug = debug
        return _run(args, rest)
    except _UsageError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return _USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"{_PROG}: error: {_one_line(exc)} (run `{_PROG} --debug ...` for the traceback)", file=sys.stderr)
        return _USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
