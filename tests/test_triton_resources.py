"""Every Triton route launches on A100 and H100/H200: ahead-of-time compiles for sm_80 and sm_90 (no GPU).

For each route the launchers can take (``triton_aot.all_routes``: every kernel, dtype, fp32 dot
precision and width class of D, for BYOL every flag combination) and every tile the autotuner may
try there, compiled from the source triton's JIT builds for such a launch: shared memory per block
within the target's limit (163 KiB on sm_80, 227 KiB on sm_90; a launch over it fails), and on
sm_90 no register spills (a stack frame). Runs in the main pass: the interpreter would replace the
compiled kernels.

The sm_90 compiles go through ptxas (0.3-20 s each, measured under load; about 300 tiles): that test
is marked ``slow`` and CI runs it. Triton caches the compiles on disk, so a rerun with unchanged
kernels takes seconds.
"""
from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from bissl_fast.kernels import byol_triton, nt_xent_triton, triton_aot, triton_routes  # noqa: E402

ROUTES = triton_aot.all_routes()
#: The autotuner compiles and times every tile of a route on the first call for each (N, D) key.
MAX_TILES_PER_ROUTE = 3


def _key(r: triton_routes.Route):
    return (r.kernel.name, r.signature, r.constexprs, r.tiles)


def test_every_route_has_a_short_tile_list():
    """Each route has 1 to 3 tiles: the first-call cost is at most 3 compiles and timing runs per kernel."""
    assert len(ROUTES) > 100  # NT-Xent: 4 passes x 4 operand kinds x 4 widths (less shared ones); BYOL: 140
    for r in ROUTES:
        assert 1 <= len(r.tiles) <= MAX_TILES_PER_ROUTE, r.name
        assert len(set(r.tiles)) == len(r.tiles), r.name


def test_enumerated_routes_cover_every_launch():
    """The launchers' routes for any D, dtype and precision are among the routes checked here."""
    checked = {_key(r) for r in ROUTES}
    kinds = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float16, "ieee")]
    for (dtype, precision), d in itertools.product(kinds, [1, 3, 16, 63, 64, 65, 100, 128, 129, 255, 256, 257, 300,
                                                           1024, 5000]):
        for kernel_pass in nt_xent_triton.PASSES:
            assert _key(nt_xent_triton.route(kernel_pass, dtype, precision, d)) in checked, (kernel_pass, dtype, d)
    for dtype, d, b in itertools.product((torch.float32, torch.bfloat16, torch.float16, torch.float64),
                                         [1, 5, 64, 100, 1000, 1024, 4000], [1, 7, 64, 65536]):
        for r in byol_triton.routes(dtype, d, b):
            if b >= 64:  # fewer rows give a smaller row block than the checked full one
                assert _key(r) in checked, r.name


def test_shared_memory_of_every_tile_fits_both_targets():
    """Front-half compiles (~0.1 s each, in one process per CPU): every tile's shared memory fits the
    block limit of sm_80 and of sm_90, with integer arguments divisible by 16 or not."""
    over = []
    for r, tile, figures in triton_aot.survey("shared"):
        for key, shared in figures.items():
            arch = "sm_" + key.split("_")[2]
            if shared > triton_aot.TARGETS[arch][1]:
                over.append(f"{r.name} {tile} ({key}): {shared / 1024:.1f} KiB")
    assert not over, "over the shared-memory limit: " + "; ".join(over)


@pytest.mark.slow
def test_every_tile_compiles_for_sm90_without_spills():
    """Whole compiles through ptxas (one process per CPU): no stack frame (spills), fewer registers
    than ptxas's cap of 255 (a tile at the cap spilled with another triton's ptxas), and the shared
    memory of the finished kernel equals the front-half figure."""
    problems = []
    for r, tile, res in triton_aot.survey("compile"):
        if res["stack"] or res["registers"] >= triton_aot.MAX_REGISTERS:
            problems.append(f"{r.name} {tile}: {res['registers']} registers, {res['stack']} B stack")
        if res["shared"] != res["shared_front_sm_90"]:
            problems.append(f"{r.name} {tile}: shared memory {res['shared']} B compiled vs "
                            f"{res['shared_front_sm_90']} B from the front half")
    assert not problems, "; ".join(problems)



def test_the_report_gives_the_unaligned_compile_beside_the_aligned_one(tmp_path, capsys):
    """``--compile --unaligned`` reports registers and stack of both integer-argument specializations."""
    import json

    match = "byol hvp fp64 1x1024 HAS_WT T_GRAD"
    assert triton_aot.main(["--compile", "--unaligned", "--match", match, "--json", str(tmp_path / "rows.json")]) == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["stack"] == 0 and row["stack_unaligned"] == 0
    assert 0 < row["registers"] < triton_aot.MAX_REGISTERS and 0 < row["registers_unaligned"] < triton_aot.MAX_REGISTERS
    assert f"| {row['registers']} / {row['registers_unaligned']} | 0 / 0 |" in capsys.readouterr().out

def test_fixed_config_mode_launches_the_first_tile(monkeypatch):
    r = nt_xent_triton.route("bwd_bwd", torch.float32, "tf32", 100)
    assert len(r.tiles) > 1
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(triton_routes.FIXED_CONFIG_ENV, "1")
    assert r.kernel.active_tiles(r.tiles) == r.tiles[:1]
    monkeypatch.setenv(triton_routes.FIXED_CONFIG_ENV, "0")
    assert r.kernel.active_tiles(r.tiles) == r.tiles
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert r.kernel.active_tiles(r.tiles) == (triton_routes.INTERPRET_TILE,)


def test_one_autotuner_per_tile_list():
    """A route with several tiles autotunes over exactly its tiles, keyed by (N, D, precision) (the
    autotuner adds the argument dtypes); each tile list has its own autotuner and timings."""
    r = nt_xent_triton.route("fwd", torch.bfloat16, "ieee", 100)
    tuner = r.kernel.tuner(r.tiles)
    assert tuner is r.kernel.tuner(r.tiles)
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in tuner.configs] == [
        (dict(t.blocks), t.num_warps, t.num_stages) for t in r.tiles]
    assert tuner.keys == ["N", "D", "PRECISION"]
    assert r.kernel.tuner(r.tiles[1:]) is not tuner
