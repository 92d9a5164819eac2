"""Console entry point ``bissl-fast``: ``bench`` (benchmark report) and ``demo`` (the BiSSL pipeline)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bissl-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark suites for this device and write a report")
    bench.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (JSON, Markdown, PNG)")
    bench.add_argument("--suite-dir", type=Path, default=None, help="folder holding bench_*.py (default: the suites shipped in bissl_fast/benchmarks)")
    bench.add_argument("--select", default=None, help="only suites whose file stem contains this string")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--max-time", type=float, default=1.0, help="seconds of timing per benchmark (pytest-benchmark max_time)")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads for every suite (default: torch's)")
    bench.add_argument("--update-readme", type=Path, default=None, help="then regenerate this README's benchmark block from the results")
    sub.add_parser("demo", help="pretext pretraining -> BiSSL -> fine-tuning on a real dataset", add_help=False)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    from .bench_report import DEFAULT_SUITE_DIR, BenchError, run_bench

    try:
        return run_bench(args.out, args.suite_dir or DEFAULT_SUITE_DIR, args.select, args.device, args.max_time,
                         args.threads, args.update_readme)
    except BenchError as exc:
        print(f"bissl-fast bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
