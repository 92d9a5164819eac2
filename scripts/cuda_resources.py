#!/usr/bin/env python3
"""Resource usage of every CUDA kernel in csrc/cuda/, per target, from the compiler (no GPU needed).

Compiles each ``csrc/cuda/*.cu`` alone with ``nvcc -Xptxas -v`` for sm_80 and sm_90 (the targets the
extension is built for) and reads, per kernel instantiation: registers per thread, static shared
memory, stack frame, spill stores/loads (ptxas' report) and the ``__launch_bounds__`` thread count
(``.maxntid`` in the PTX). From the sources it reads the block size every launch site uses
(``kernel<...><<<grid, BLOCK, ...>>>`` with ``BLOCK`` a ``constexpr int`` of the file) and prints a
Markdown table with the resident blocks per SM that the registers, threads and shared memory allow.

Fails (exit 1) when a kernel spills or has a stack frame, has no ``__launch_bounds__``, is launched
with more threads than its bounds, or cannot fit one block of that size on a multiprocessor.

    python3 scripts/cuda_resources.py [--arch sm_80 sm_90] [--json out.json]
"""
from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Per multiprocessor, the same on sm_80 and sm_90: 64 K registers, 2048 threads, 32 blocks; shared
#: memory per SM is 164 KiB on sm_80 and 228 KiB on sm_90, 1 KiB of it reserved per block.
REGS_PER_SM, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 2048, 32
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
STATIC_SMEM_LIMIT = 48 * 1024
#: Registers are allocated per warp in units of 256.
REG_UNIT = 256


@dataclass
class Kernel:
    file: str
    arch: str
    name: str  # demangled, without the parameter list
    registers: int
    smem: int
    stack: int
    spill_stores: int
    spill_loads: int
    max_threads: int | None  # __launch_bounds__
    block: int | None  # threads per block at the launch sites
    blocks_per_sm: int = 0

    @property
    def base(self) -> str:
        return self.name.split("<")[0].split("::")[-1]


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    names = (line.replace("(anonymous namespace)::", "").removeprefix("void ") for line in out.splitlines())
    return [name.split("(")[0].removeprefix("bissl_fast::") for name in names]


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per mangled entry name: registers, smem, stack, spill_stores, spill_loads."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = kernels.setdefault(m.group(1), {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0,
                                                      "spill_loads": 0})
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m[1])
            if s := re.search(r"(\d+) bytes smem", line):
                current["smem"] = int(s[1])
    return kernels


def parse_maxntid(ptx: str) -> dict[str, int]:
    """``__launch_bounds__`` thread count per mangled entry name (entries without bounds are absent)."""
    bounds = {}
    for m in re.finditer(r"\.entry (\w+)\(.*?\n\{", ptx, re.S):  # the header: parameters, then directives
        if b := re.search(r"\.maxntid (\d+), (\d+), (\d+)", m.group(0)):
            bounds[m.group(1)] = int(b[1]) * int(b[2]) * int(b[3])
    return bounds


_INT_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.floordiv}


def int_expr(expr: str, constants: dict[str, int]) -> int | None:
    """Value of a C++ integer expression of literals and known constants (``+ - * /``), else None."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return constants[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _INT_OPS:
            return _INT_OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(expr)

    try:
        return value(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, KeyError):
        return None


def launch_blocks(source: str) -> dict[str, set[int]]:
    """Threads per block at each launch site, by kernel name: ``<<<grid, BLOCK`` with BLOCK a
    literal or a ``constexpr int`` of the file."""
    constants: dict[str, int] = {}
    for name, expr in re.findall(r"constexpr int (\w+) = ([^;]+);", source):
        if (v := int_expr(expr, constants)) is not None:
            constants[name] = v
    blocks: dict[str, set[int]] = {}
    for kernel, block in re.findall(r"(\w+)(?:<[^<>;]*>)?<<<[^,;]+,\s*(\w+)\s*[,>]", source):
        value = int_expr(block, constants)
        if value is None:
            raise SystemExit(f"cuda_resources: cannot evaluate the block size '{block}' of {kernel}'s launch")
        blocks.setdefault(kernel, set()).add(value)
    return blocks


def blocks_per_sm(k: Kernel) -> int:
    threads = k.block or k.max_threads or 0
    if threads == 0:
        return 0
    warps = -(-threads // 32)
    warp_regs = -(-max(k.registers, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = REGS_PER_SM // (warp_regs * warps)
    by_smem = SMEM_PER_SM[k.arch] // (k.smem + 1024)
    return min(BLOCKS_PER_SM, THREADS_PER_SM // threads, by_regs, by_smem)


def compile_file(cu: Path, arch: str, nvcc: str, tmp: Path) -> list[Kernel]:
    keep = tmp / f"{cu.stem}_{arch}"
    keep.mkdir()
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", f"-I{ROOT / 'csrc' / 'include'}", "-Xptxas", "-v",
           "--keep", "--keep-dir", str(keep), "-c", str(cu), "-o", str(keep / "out.o")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"cuda_resources: nvcc failed on {cu} ({arch}):\n{run.stderr[-4000:]}")
    stats = parse_ptxas(run.stderr + run.stdout)
    bounds = parse_maxntid("\n".join(p.read_text() for p in keep.glob("*.ptx")))
    launches = launch_blocks(cu.read_text())
    mangled = sorted(stats)
    kernels = []
    for raw, name in zip(mangled, demangle(mangled)):
        k = Kernel(file=str(cu.relative_to(ROOT)), arch=arch, name=name, max_threads=bounds.get(raw), block=None,
                   **stats[raw])
        sites = launches.get(k.base, set())
        k.block = max(sites) if sites else None
        k.blocks_per_sm = blocks_per_sm(k)
        kernels.append(k)
    return kernels


def problems(k: Kernel) -> list[str]:
    found = []
    if k.spill_stores or k.spill_loads or k.stack:
        found.append(f"spills ({k.spill_stores} B stores, {k.spill_loads} B loads, {k.stack} B stack)")
    if k.max_threads is None:
        found.append("no __launch_bounds__")
    if k.block is None:
        found.append("no launch site found")
    elif k.max_threads is not None and k.block > k.max_threads:
        found.append(f"launched with {k.block} threads > __launch_bounds__ {k.max_threads}")
    if k.smem > STATIC_SMEM_LIMIT:
        found.append(f"{k.smem} B static shared memory > 48 KiB")
    if k.blocks_per_sm < 1:
        found.append("one block does not fit on a multiprocessor")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    parser.add_argument("--nvcc", default="nvcc")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp:
        kernels = [k for cu in sources for arch in args.arch for k in compile_file(cu, arch, args.nvcc, Path(tmp))]
    print("| kernel | arch | registers | static smem (B) | stack (B) | spills st/ld (B) | launch bounds | block | "
          "blocks/SM |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = []
    for k in sorted(kernels, key=lambda k: (k.file, k.name, k.arch)):
        print(f"| `{k.name}` | {k.arch} | {k.registers} | {k.smem} | {k.stack} | {k.spill_stores}/{k.spill_loads} | "
              f"{k.max_threads} | {k.block} | {k.blocks_per_sm} |")
        failures += [f"{k.file}: {k.name} ({k.arch}): {p}" for p in problems(k)]
    if args.json:
        args.json.write_text(json.dumps([asdict(k) for k in kernels], indent=1))
    print(f"\n{len(kernels)} kernel instantiations in {len(sources)} files for {', '.join(args.arch)}: "
          + ("no spills, every launch within its bounds" if not failures else f"{len(failures)} problems"))
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
