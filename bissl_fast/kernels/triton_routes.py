"""Routes of the Triton kernels: what one launch compiles, and the tiles it may try (docs/design.md §2.1).

A :class:`Route` is one way a launcher runs a kernel: the kernel, the element type of each pointer
argument, the constexprs the launcher fixes (block widths, dot precision, ...) and the short list of
tiles the autotuner may try there. Launchers build their routes with a function of the inputs, and
``triton_aot.py`` builds every route the same functions can return and compiles each tile ahead of
time for sm_80 and sm_90 (``tests/test_triton_resources.py``): shared memory within both targets'
per-block limit, no register spills on sm_90. So a route's tile list is the set of tiles known to
launch there, and no GPU time goes into compiling a tile that cannot.

Modes, read at each launch: by default a route with several tiles is autotuned over them (one
autotuner per route, keyed by the kernel's ``tune_key`` arguments and the argument dtypes);
``BISSL_FAST_TRITON_FIXED_CONFIG=1`` launches each route's first tile only (one compile per kernel
and specialization, no timing runs: for correctness runs such as the GPU tests); under
``TRITON_INTERPRET=1`` without it, every route runs :data:`INTERPRET_TILE`.

This module imports triton, so it is only imported when a Triton launch is requested.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton

from .._backends import triton_interpret_mode

#: Set to 1 to launch every route's first tile without autotuning.
FIXED_CONFIG_ENV = "BISSL_FAST_TRITON_FIXED_CONFIG"

#: Triton's name of each tensor element type, as in a compile signature (``"*fp32"`` is a pointer).
TRITON_TYPES: Mapping[torch.dtype, str] = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
}


@dataclasses.dataclass(frozen=True)
class Tile:
    """One launch configuration: the tile constexprs (e.g. ``BLOCK_M``, ``BLOCK_N``), warps, stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int = 1

    def config(self) -> triton.Config:
        return triton.Config(dict(self.blocks), num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        sizes = "x".join(str(v) for _, v in self.blocks)
        return " ".join(part for part in (sizes, f"w{self.num_warps}", f"s{self.num_stages}") if part)


def mn_tile(block_m: int, block_n: int, num_warps: int, num_stages: int) -> Tile:
    """A ``BLOCK_M x BLOCK_N`` tile of rows and columns (the NT-Xent kernels)."""
    return Tile((("BLOCK_M", block_m), ("BLOCK_N", block_n)), num_warps, num_stages)


#: Under the interpreter each program runs in numpy: one small tile keeps the CPU tests fast and makes
#: every test shape span several row and column tiles.
INTERPRET_TILE = mn_tile(16, 16, 1, 1)


def fixed_config_mode() -> bool:
    """True when launches use each route's first tile only (``BISSL_FAST_TRITON_FIXED_CONFIG=1``)."""
    return os.environ.get(FIXED_CONFIG_ENV, "0") == "1"


class RoutedKernel:
    """A ``@triton.jit`` kernel launched through routes: one autotuner per tile list.

    ``tune_key`` names the arguments whose values select a tuned tile (besides the argument dtypes,
    which triton's autotuner adds itself). ``interpret_tile`` is the tile under the interpreter, or
    None for kernels whose tiles are fixed by the launcher (every route of them has one tile).
    """

    def __init__(self, fn: triton.JITFunction, tune_key: tuple[str, ...] = (),
                 interpret_tile: Tile | None = INTERPRET_TILE) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.tune_key = list(tune_key)
        self.interpret_tile = interpret_tile
        self._tuners: dict[tuple[Tile, ...], Any] = {}

    def active_tiles(self, tiles: tuple[Tile, ...]) -> tuple[Tile, ...]:
        """The tiles a launch with this tile list tries in the current mode."""
        if fixed_config_mode():
            return tiles[:1]
        if triton_interpret_mode() and self.interpret_tile is not None:
            return (self.interpret_tile,)
        return tiles

    def launch(self, grid: Callable[[dict], tuple[int, ...]] | tuple[int, ...], tiles: tuple[Tile, ...],
               *args: Any, **constexprs: Any) -> None:
        active = self.active_tiles(tiles)
        if len(active) == 1:
            tile = active[0]
            self.fn[grid](*args, **constexprs, **dict(tile.blocks), num_warps=tile.num_warps,
                          num_stages=tile.num_stages)
            return
        self.tuner(active)[grid](*args, **constexprs)

    def tuner(self, tiles: tuple[Tile, ...]) -> Any:
        """The autotuner over ``tiles`` (one per tile list, so each route keeps its own timings)."""
        tuner = self._tuners.get(tiles)
        if tuner is None:
            tuner = triton.autotune(configs=[t.config() for t in tiles], key=self.tune_key)(self.fn)
            self._tuners[tiles] = tuner
        return tuner


@dataclasses.dataclass(frozen=True)
class Route:
    """One launch path of a kernel: argument types, fixed constexprs and the tiles that fit there.

    ``signature`` gives the triton type of every runtime argument in order (``"*bf16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` the launcher's constexpr arguments (not the tile's).
    """

    name: str
    kernel: RoutedKernel
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    tiles: tuple[Tile, ...]

    def launch(self, grid: Callable[[dict], tuple[int, ...]] | tuple[int, ...], *args: Any) -> None:
        self.kernel.launch(grid, self.tiles, *args, **dict(self.constexprs))


def pointer(dtype: torch.dtype) -> str:
    """Signature type of a pointer to ``dtype`` elements."""
    return "*" + TRITON_TYPES[dtype]
