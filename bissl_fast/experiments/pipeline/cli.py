"""``bissl-fast run``: the pipeline's command line (``--config FILE.toml`` plus one flag per setting)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Sequence

from .config import FIELD_HELP, PipelineConfig, config_from_toml, resolve_config, shipped_configs
from .runner import format_summary, run_pipeline


def build_parser() -> argparse.ArgumentParser:
    """``bissl-fast run``: ``--config FILE.toml`` plus one flag per :class:`PipelineConfig` field (flags win)."""

    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            self.exit(2, f"{self.prog}: error: {message}\n")

    parser = OneLineErrors(
        prog="bissl-fast run",
        description="The BiSSL pipeline: pretext checkpoint -> head warm-up -> BiSSL -> fine-tuning. "
        "Same command for 1 process or N under `torchrun --nproc_per_node=N -m bissl_fast.cli run ...`.",
    )
    parser.add_argument("--config", default=None, help="TOML file of settings (the flag names below, '_' for '-'), "
                        f"or the name of a shipped one: {', '.join(shipped_configs())}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    for f in fields(PipelineConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if "bool" in kind:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=FIELD_HELP[f.name])
        else:
            parse = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=f.name, type=parse, default=None, metavar=parse.__name__.upper(),
                                help=FIELD_HELP[f.name] + ("" if f.default is None else f" (default {f.default})"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``bissl-fast run``; bad input exits with status 2 and one line on stderr."""
    args = vars(build_parser().parse_args(argv))
    config_path, debug = args.pop("config"), args.pop("debug")
    try:
        if config_path is not None:
            cfg = config_from_toml(resolve_config(config_path), **args)
        else:
            cfg = PipelineConfig(**{k: v for k, v in args.items() if v is not None})
        summary = run_pipeline(cfg)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        if debug:
            raise
        print(f"bissl-fast run: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        print(f"outputs in {cfg.out}: summary.json, log.jsonl, checkpoint.pt, bissl_backbones.pt")
    return 0


__all__ = ["build_parser", "main"]
