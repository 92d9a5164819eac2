"""Where the time of a Hessian-vector product and of a BiSSL upper stage goes, by phase and layer type.

One thread, CPU (or the device given). For each model, ``torch.profiler`` records

- one HVP: the graph build of :class:`~bissl_fast.HessianOperator` (forward + first-order graph)
  and one product (double backward);
- one upper stage: the graph build, then ``solves`` implicit-gradient solves of ``cg_iters`` CG
  iterations each (docs/design.md §2.4), products reusing the graph;

and splits the self time of every recorded op into a phase (forward, first-order graph, double
backward, CG vector work) and the layer type it belongs to (conv, BatchNorm, linear, activation,
loss, other). Ops run inside an autograd node inherit the type of the forward op that created the
node (profiler sequence numbers), so the double backward of a BatchNorm counts as BatchNorm.
Each run is profiled several times after a warm-up and every cell keeps its least value, so a
preemption by another process does not land in one layer type's column.

    python -m bissl_fast.bench.profile_hvp --out profile.json        # table on stdout, JSON to --out

The models are the upper-stage benchmark's CPU models (``stage_backbone``): the built-in
SmallResNet at widths (16, 32) and (16, 32, 64), and a plain conv-BatchNorm-ReLU net.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import reference
from ..solver import HessianOperator, ImplicitGradient
from ..train.models import PretextModel, SmallResNet, resnet18_cifar

PHASES = ("forward", "first-order graph", "double backward", "CG vector work")
LAYER_TYPES = ("conv", "BatchNorm", "linear", "activation", "loss", "other")
CPU_MODELS = ("small", "small3", "bnconv")

_PHASE_PREFIX = "phase:"
_LAYER_PREFIX = "layer:"
_NODE_PREFIX = "autograd::engine::evaluate_function: "
# The phase a range's own events belong to: "build" minus "forward" is the first-order graph; "solve" minus
# the products is CG vector work.
_RANGE_PHASE = {"build": "first-order graph", "forward": "forward", "product": "double backward", "solve": "CG vector work"}


class BNConvNet(nn.Module):
    """Plain conv-BatchNorm-ReLU stack without shortcuts: ``[B, C, H, W]`` -> ``[B, out_dim]``.

    Channels ``widths`` (stride 2 from the second layer on), mean-pooled at the end.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (16, 32, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(in_ch, width, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.out_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def stage_backbone(name: str, in_channels: int = 3) -> tuple[nn.Module, int]:
    """Backbone and feature size by name: ``small`` (SmallResNet 16-32), ``small3`` (16-32-64),
    ``bnconv`` (:class:`BNConvNet`), ``resnet18`` (CIFAR ResNet-18)."""
    if name == "small":
        net: nn.Module = SmallResNet(in_channels, widths=(16, 32))
    elif name == "small3":
        net = SmallResNet(in_channels, widths=(16, 32, 64), blocks=(1, 1, 1))
    elif name == "bnconv":
        net = BNConvNet(in_channels)
    elif name == "resnet18":
        net = resnet18_cifar(in_channels)
    else:
        raise ValueError(f"unknown stage backbone {name!r}; expected small, small3, bnconv or resnet18")
    return net, net.out_dim  # type: ignore[return-value]


@dataclass
class StageProblem:
    """One lower batch of a BiSSL upper stage: ``loss_fn()`` (a scalar), the backbone ``params``,
    the modules fwd-rev needs, and one right-hand side ``vs[k]`` (shaped like ``params``) per solve."""

    loss_fn: Callable[[], torch.Tensor]
    modules: nn.Module
    params: tuple[torch.Tensor, ...]
    vs: list[tuple[torch.Tensor, ...]]


def stage_problem(
    loss: str, backbone: nn.Module, feature_dim: int, batch: int, res: int, device: torch.device, solves: int,
    mark_ranges: bool = False,
) -> StageProblem:
    """Pretext model (projector; BYOL adds a predictor and an EMA target) on ``batch`` random images
    per view of ``res x res``, loss ``simclr`` (reference NT-Xent) or ``byol`` (reference BYOL).

    ``mark_ranges`` wraps the forward and the loss in profiler ranges (for :func:`profile_stage`).
    """
    if loss not in ("simclr", "byol"):
        raise ValueError(f"loss must be 'simclr' or 'byol', got {loss!r}")
    torch.manual_seed(0)
    model = PretextModel(backbone, feature_dim, proj_dim=128, hidden_dim=512, predictor=loss == "byol").to(device)
    x1, x2 = torch.randn(2, batch, 3, res, res, device=device)

    def ranged(name: str):
        if mark_ranges:
            return torch.profiler.record_function(name)
        return _NoRange()

    if loss == "simclr":
        x = torch.cat([x1, x2])

        def loss_fn() -> torch.Tensor:
            with ranged(_PHASE_PREFIX + "forward"):
                z = model(x)
                with ranged(_LAYER_PREFIX + "loss"):
                    return reference.nt_xent(z, 0.5)

        modules: nn.Module = model
    else:
        target = copy.deepcopy(model).requires_grad_(False)

        def loss_fn() -> torch.Tensor:
            with ranged(_PHASE_PREFIX + "forward"):
                with torch.no_grad():
                    t1, t2 = target(x1), target(x2)
                p1, p2 = model.predictor(model(x1)), model.predictor(model(x2))
                with ranged(_LAYER_PREFIX + "loss"):
                    return reference.byol_loss(p1, p2, t1, t2)

        modules = nn.ModuleList([model, target])
    params = tuple(backbone.parameters())
    gen = torch.Generator().manual_seed(1)
    vs = [tuple(torch.randn(p.shape, generator=gen).to(device) for p in params) for _ in range(solves)]
    return StageProblem(loss_fn, modules, params, vs)


class _NoRange:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _RangedProducts:
    """A HessianOperator whose products are marked as the double-backward phase."""

    def __init__(self, op: HessianOperator) -> None:
        self._op = op
        self.params = op.params

    def matvec(self, v: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.profiler.record_function(_PHASE_PREFIX + "product"):
            return self._op.matvec(v)


_NAME_TYPES = (
    ("batch_norm", "BatchNorm"), ("BatchNorm", "BatchNorm"),
    ("conv", "conv"), ("Convolution", "conv"),
    ("linear", "linear"), ("addmm", "linear"), ("Addmm", "linear"),
    ("relu", "activation"), ("Relu", "activation"), ("threshold", "activation"), ("Threshold", "activation"),
)


def _type_from_name(name: str) -> str | None:
    for needle, layer in _NAME_TYPES:
        if needle in name:
            return layer
    return None


def breakdown(events: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds of profiler ``events`` by phase and layer type (see the module doc)."""
    ordered = sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end))
    by_seq: dict[int, str] = {}
    layer_of: dict[int, str | None] = {}
    phase_of: dict[int, str | None] = {}
    table = {phase: dict.fromkeys(LAYER_TYPES, 0.0) for phase in PHASES}
    for e in ordered:
        parent = e.cpu_parent
        inherited_layer = layer_of.get(id(parent)) if parent is not None else None
        inherited_phase = phase_of.get(id(parent)) if parent is not None else None
        name = e.name
        if name.startswith(_PHASE_PREFIX):
            phase = _RANGE_PHASE.get(name[len(_PHASE_PREFIX):], inherited_phase)
            layer = inherited_layer
        elif name.startswith(_LAYER_PREFIX):
            phase, layer = inherited_phase, name[len(_LAYER_PREFIX):]
        elif name.startswith(_NODE_PREFIX):
            # An autograd node belongs to the layer of the forward op that recorded it.
            phase = inherited_phase
            layer = by_seq.get(e.sequence_nr) or _type_from_name(name[len(_NODE_PREFIX):]) or inherited_layer
        else:
            phase = inherited_phase
            layer = inherited_layer or _type_from_name(name)
        if e.sequence_nr >= 0 and layer is not None and e.sequence_nr not in by_seq:
            by_seq[e.sequence_nr] = layer
        layer_of[id(e)], phase_of[id(e)] = layer, phase
        if phase is not None:
            table[phase][layer or "other"] += e.self_cpu_time_total / 1e3
    return table


def profile_stage(problem: StageProblem, damping: float, solves: int, cg_iters: int) -> dict[str, Any]:
    """Profiles one HVP and one upper stage (rev-rev, graph reused) of ``problem``; see the module doc."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def build() -> HessianOperator:
        with record_function(_PHASE_PREFIX + "build"):
            return HessianOperator(problem.loss_fn, problem.params, mode="rev-rev")

    def hvp() -> None:
        with build() as op:
            _RangedProducts(op).matvec(problem.vs[0])

    def stage() -> None:
        solver = ImplicitGradient(problem.params, damping=damping, iters=cg_iters)
        with build() as op:
            ranged = _RangedProducts(op)
            for v in problem.vs[:solves]:
                with record_function(_PHASE_PREFIX + "solve"):
                    solver.solve(ranged, v)

    result = {}
    for name, fn, repeats in (("one HVP", hvp, 5), (f"upper stage {solves}x{cg_iters} CG", stage, 2)):
        fn()  # warm-up: allocator, oneDNN primitive caches
        runs = []
        for _ in range(repeats):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            runs.append(breakdown(prof.events()))
        # Per cell the least of the runs: another process preempting one op only ever adds time to its cell.
        table = {phase: {layer: min(run[phase][layer] for run in runs) for layer in LAYER_TYPES} for phase in PHASES}
        result[name] = {"ms": table, "total_ms": sum(sum(row.values()) for row in table.values()), "runs": repeats}
    return result


def format_breakdown(model: str, result: dict[str, Any]) -> str:
    """Markdown table per profiled run: phases as rows, layer types as columns, ms and % of the total."""
    lines = []
    for run, data in result.items():
        total = data["total_ms"]
        lines.append(
            f"**{model}, {run}** (self CPU time {total:.1f} ms; each cell the least of {data['runs']} profiled runs; "
            "profiler overhead included)\n"
        )
        lines.append("| phase | " + " | ".join(LAYER_TYPES) + " | phase total |")
        lines.append("|---|" + "---:|" * (len(LAYER_TYPES) + 1))
        columns = dict.fromkeys(LAYER_TYPES, 0.0)
        for phase in PHASES:
            row = data["ms"][phase]
            for layer in LAYER_TYPES:
                columns[layer] += row[layer]
            cells = " | ".join(f"{row[layer]:.1f}" for layer in LAYER_TYPES)
            lines.append(f"| {phase} | {cells} | {sum(row.values()):.1f} ({100 * sum(row.values()) / total:.0f}%) |")
        cells = " | ".join(f"{columns[layer]:.1f} ({100 * columns[layer] / total:.0f}%)" for layer in LAYER_TYPES)
        lines.append(f"| all | {cells} | {total:.1f} |")
        lines.append("")
    return "\n".join(lines)


def run_profiles(
    models: Sequence[str] = CPU_MODELS, loss: str = "simclr", batch: int = 16, res: int = 12,
    solves: int = 8, cg_iters: int = 5, device: torch.device = torch.device("cpu"), damping: float = 10.0,
) -> dict[str, Any]:
    """Profiles of one HVP and one upper stage per model, on one intra-op thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {
            "loss": loss, "batch_per_view": batch, "resolution": res, "solves": solves, "cg_iters": cg_iters,
            "threads": 1, "device": str(device), "torch": torch.__version__, "models": {},
        }
        for name in models:
            net, dim = stage_backbone(name)
            problem = stage_problem(loss, net, dim, batch, res, device, solves, mark_ranges=True)
            out["models"][name] = profile_stage(problem, damping, solves, cg_iters)
        return out
    finally:
        torch.set_num_threads(threads)


def format_profiles(profiles: dict[str, Any]) -> str:
    header = (
        f"Per-layer-type breakdown: {profiles['loss']}, {profiles['batch_per_view']} images per view at "
        f"{profiles['resolution']}x{profiles['resolution']}, {profiles['threads']} thread, graph reused (rev-rev); "
        "ms of self CPU time under torch.profiler.\n"
    )
    return header + "\n" + "\n".join(format_breakdown(m, r) for m, r in profiles["models"].items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl_fast.bench.profile_hvp", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CPU_MODELS), choices=["small", "small3", "bnconv", "resnet18"])
    parser.add_argument("--loss", default="simclr", choices=["simclr", "byol"])
    parser.add_argument("--out", type=Path, default=None, help="write the breakdown as JSON here")
    args = parser.parse_args(argv)
    profiles = run_profiles(args.models, args.loss)
    print(format_profiles(profiles))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(profiles, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
