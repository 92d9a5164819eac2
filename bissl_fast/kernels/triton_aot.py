"""Ahead-of-time compiles of every Triton route for sm_80 and sm_90, and their resource usage (no GPU).

Triton compiles for a named target with its bundled ``ptxas``, so the resources a launch will ask
for are known before any GPU is seen: shared memory per block (a launch over the device's limit
fails with "out of resources"), registers per thread and the stack frame that spills make
(``cuobjdump --dump-resource-usage`` on the cubin). Each tile is compiled from the source and options
that triton's JIT itself builds for a launch (:func:`launch_source`), with 16-byte aligned pointers
and integer arguments divisible by 16 or not: what is checked here is what launches, and a compile
here fills triton's cache for that launch.

:func:`shared_memory` runs only the compiler's front half (to TritonGPU IR and the shared-memory
allocation pass, ~0.1 s), :func:`compile_resources` the whole pipeline through ``ptxas`` (0.3-20 s;
cached by triton on disk). The shared-memory pass is an internal of triton (checked with 3.6 and
3.8, the two CI venvs' versions); ``tests/test_triton_resources.py`` checks that both agree.

    python -m bissl_fast.kernels.triton_aot [--compile [--unaligned]] [--fresh] [--match TEXT] [--workers N]
                                            [--json PATH]

prints every route's tiles with their shared memory on both targets (``--compile`` adds sm_90
registers, stack and compile time; ``--fresh`` bypasses triton's cache so the time is a real compile;
``--unaligned`` also compiles for integer arguments not divisible by 16, and reports their registers and
stack after the aligned ones).
:func:`survey` spreads the tiles over worker processes, as the tests do.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton import knobs
from triton._C.libtriton import get_cache_invalidating_env_vars, ir, nvidia, passes
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptx_version_from_options
from triton.compiler import ASTSource, make_backend
from triton.runtime.cache import get_cache_key, get_cache_manager
from triton.runtime.driver import driver as triton_driver

from .._backends import triton_interpret_mode
from . import byol_triton, nt_xent_triton
from .triton_routes import TRITON_TYPES, Route, Tile

#: Compute capability and shared memory a block may use (the opt-in maximum) per target.
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
#: The most registers ptxas gives a thread; more live values spill to the stack.
MAX_REGISTERS = 255


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled tile asks of a multiprocessor (``compile_s`` is this process's compile time)."""

    shared: int
    registers: int
    stack: int
    compile_s: float


class _TargetOnlyDriver:
    """As much of a CUDA driver as triton's JIT asks for to bind a launch: the target, device 0."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def launch_source(route: Route, tile: Tile, arch: str = "sm_90", aligned: bool = True
                  ) -> tuple[ASTSource, dict[str, object]]:
    """The source and options that triton's JIT compiles for a launch of ``tile`` of ``route`` on
    ``arch``, taken from the JIT itself (its binder and specialization, without a GPU: a stand-in
    driver names the target, and the compile call is caught). Pointers are 16-byte aligned; integer
    arguments are 1024 if ``aligned`` (divisible by 16), else 1000. Compiling these is compiling the
    launch: same binary, and the same key in triton's cache."""
    fn = route.kernel.fn
    dtypes = {f"*{name}": dtype for dtype, name in TRITON_TYPES.items()}
    args = [dtypes[kind] if kind.startswith("*") else (1024 if aligned else 1000) if kind == "i32" else 0.5
            for _, kind in route.signature]
    captured: dict[str, object] = {}

    def catch_compile(src: ASTSource, target: GPUTarget, options: dict[str, object]) -> None:
        captured.update(src=src, options=options)

    saved_driver, saved_caches, saved_compile = triton_driver._active, fn.device_caches, fn.__dict__.get("compile")
    triton_driver.set_active(_TargetOnlyDriver(_target(arch)))
    fn.device_caches = collections.defaultdict(fn.create_binder)
    try:
        fn.device_caches[0]  # binds for the target; this sets fn.compile, which the launch then calls
        fn.compile = catch_compile
        fn.warmup(*args, grid=(1,), **dict(route.constexprs), **dict(tile.blocks), num_warps=tile.num_warps,
                  num_stages=tile.num_stages)
    finally:
        triton_driver._active, fn.device_caches = saved_driver, saved_caches
        if saved_compile is None:
            fn.__dict__.pop("compile", None)
        else:
            fn.compile = saved_compile
    return captured["src"], captured["options"]


def _target(arch: str) -> GPUTarget:
    return GPUTarget("cuda", TARGETS[arch][0], 32)


def shared_memory(route: Route, tile: Tile, arch: str, aligned: bool = True) -> int:
    """Bytes of shared memory per block that ``tile`` of ``route`` allocates on ``arch``; kept in
    triton's disk cache under the compile's own key, so a rerun with unchanged kernels only looks it up."""
    capability = TARGETS[arch][0]
    backend = make_backend(_target(arch))
    src, launch_options = launch_source(route, tile, arch, aligned)
    options = backend.parse_options(launch_options)
    key = get_cache_key(src, backend, options, get_cache_invalidating_env_vars())
    cache = get_cache_manager(hashlib.sha256(f"shared-memory-{key}".encode()).hexdigest())
    cached = cache.get_file("shared.json")
    if cached is not None:
        with open(cached) as f:
            return json.load(f)["shared"]
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    metadata = {"target": _target(arch), **options.__dict__}
    module = src.make_ir(_target(arch), options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    module = stages["ttgir"](stages["ttir"](module, metadata), metadata)
    # The first passes of the backend's make_llir, up to the shared-memory allocation.
    pm = ir.pass_manager(module.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability,
                                                         get_ptx_version_from_options(options, capability))
    pm.run(module, "shared_memory")
    shared = module.get_int_attr("ttg.shared")
    cache.put(json.dumps({"shared": shared}), "shared.json", binary=False)
    return shared


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` of a cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if m is None:
        raise RuntimeError(f"no resource line in cuobjdump's report:\n{report}")
    return int(m[1]), int(m[2])


def compile_resources(route: Route, tile: Tile, arch: str = "sm_90", fresh: bool = False, aligned: bool = True
                      ) -> Resources:
    """Compile ``tile`` of ``route`` for ``arch`` through ptxas (``fresh``: bypass triton's cache). The
    compile is the JIT's for such a launch, so it also fills triton's cache for it."""
    previous = knobs.compilation.always_compile
    knobs.compilation.always_compile = fresh
    try:
        start = time.perf_counter()
        src, options = launch_source(route, tile, arch, aligned)
        compiled = triton.compile(src, target=_target(arch), options=options)
        seconds = time.perf_counter() - start
    finally:
        knobs.compilation.always_compile = previous
    registers, stack = _cubin_resources(compiled.asm["cubin"])
    return Resources(compiled.metadata.shared, registers, stack, seconds)


def _unique(routes: Iterator[Route]) -> list[Route]:
    seen, out = set(), []
    for r in routes:
        key = (r.kernel.name, r.signature, r.constexprs, r.tiles)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def nt_xent_routes() -> list[Route]:
    """Every route the NT-Xent launchers can take: each dtype and precision, each width class of D."""
    kinds = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float16, "ieee")]
    # D <= 64 pads to 64; 128 and 256 are the other resident widths; every D > 256 compiles alike.
    widths = (64, 128, 256, 512)
    return _unique(nt_xent_triton.route(p, dtype, precision, d)
                   for dtype, precision in kinds for d in widths for p in nt_xent_triton.PASSES)


def byol_routes() -> list[Route]:
    """Every route the BYOL launchers can take at full row blocks (many rows), each dtype and width."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    widths = (64, 128, 256, 512, 1024)  # D is padded to a power of two from 64 to 1024
    return _unique(r for dtype in dtypes for d in widths for r in byol_triton.routes(dtype, d))


def all_routes() -> list[Route]:
    return nt_xent_routes() + byol_routes()


def _job(job: tuple[int, int, str, bool, bool]) -> dict[str, object]:
    """One tile's figures (runs in a worker process). ``shared`` mode: the front-half shared memory on
    every target, for aligned and unaligned integer arguments; ``compile`` mode: the sm_90 compile of
    the ``aligned`` variant, with its front-half figure to compare."""
    route_index, tile_index, mode, aligned, fresh = job
    r = all_routes()[route_index]
    tile = r.tiles[tile_index]
    if mode == "shared":
        return {f"shared_{arch}{'' if variant else '_unaligned'}": shared_memory(r, tile, arch, variant)
                for arch in TARGETS for variant in (True, False)}
    res = compile_resources(r, tile, "sm_90", fresh=fresh, aligned=aligned)
    return {**dataclasses.asdict(res), "shared_front_sm_90": shared_memory(r, tile, "sm_90", aligned)}


def survey(mode: str, match: str = "", workers: int | None = None, fresh: bool = False,
           variants: tuple[bool, ...] = (True,)) -> list[tuple[Route, Tile, dict[str, object]]]:
    """``mode`` ("shared" or "compile") figures of every tile of every route whose name contains
    ``match``, computed in ``workers`` processes (default: one per CPU; 1 runs here). ``variants``: the
    ``aligned`` values to compile in ``compile`` mode (``shared`` mode always covers both)."""
    routes = all_routes()
    jobs = [(i, j, mode, aligned, fresh) for i, r in enumerate(routes) if match in r.name
            for j in range(len(r.tiles)) for aligned in (variants if mode == "compile" else (True,))]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        results = [_job(job) for job in jobs]
    else:
        # spawn: a forked child would inherit this process's triton and torch state mid-use.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_job, jobs))
    return [(routes[job[0]], routes[job[0]].tiles[job[1]], res) for job, res in zip(jobs, results)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Resources of every Triton route tile, compiled ahead of time.")
    parser.add_argument("--compile", action="store_true", help="also compile for sm_90 through ptxas")
    parser.add_argument("--fresh", action="store_true", help="bypass triton's cache (real compile times)")
    parser.add_argument("--match", default="", help="only routes whose name contains this")
    parser.add_argument("--unaligned", action="store_true",
                        help="with --compile, also compile for integer arguments not divisible by 16")
    parser.add_argument("--workers", type=int, default=1, help="processes (more than 1 distorts compile times)")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if triton_interpret_mode():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels that are compiled here")
    rows = []
    shared = survey("shared", args.match, args.workers)
    compiled = (survey("compile", args.match, args.workers, args.fresh, (True,)) if args.compile
                else [None] * len(shared))
    # Also fills triton's cache for such launches.
    unaligned = (survey("compile", args.match, args.workers, args.fresh, (False,)) if args.compile and args.unaligned
                 else [None] * len(shared))
    # Shared memory: the larger of the aligned and unaligned variants. Registers / stack: "aligned / unaligned".
    print("| route | kernel | tile | shared sm_80 (KiB) | shared sm_90 (KiB) | registers | stack (B) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for (r, tile, figures), full, loose in zip(shared, compiled, unaligned):
        row = {"route": r.name, "kernel": r.kernel.name, "tile": str(tile), **figures}
        cells = {"registers": "", "stack": "", "compile_s": ""}
        if full is not None:
            res = full[2]
            row.update(registers=res["registers"], stack=res["stack"], compile_s=round(res["compile_s"], 2))
            cells = {key: str(row[key]) for key in cells}
        if loose is not None:
            res = loose[2]
            row.update(registers_unaligned=res["registers"], stack_unaligned=res["stack"])
            cells["registers"] += f" / {res['registers']}"
            cells["stack"] += f" / {res['stack']}"
        rows.append(row)
        shared_kib = {arch: max(figures[f"shared_{arch}"], figures[f"shared_{arch}_unaligned"]) / 1024
                      for arch in TARGETS}
        print(f"| {r.name} | {r.kernel.name} | {tile} | {shared_kib['sm_80']:.1f} | {shared_kib['sm_90']:.1f} | "
              f"{cells['registers']} | {cells['stack']} | {cells['compile_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
