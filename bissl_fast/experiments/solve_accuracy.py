"""How accurate is the implicit gradient? Every solver against the EXACT solution of the BiSSL system.

For a small ResNet-style backbone (:class:`bissl_fast.train.models.SmallResNet`, float64) with the
SimCLR loss on a batch of digits (two augmented views, one forward per view, train-mode BatchNorm),
this builds the dense Hessian ``H`` of the pretext loss w.r.t. the backbone (one batched product per
block of columns), solves ``A x* = v``, ``A = I + H / (lam + damping)``, exactly (``torch.linalg.solve``),
with ``v`` the downstream gradient that BiSSL's upper level passes through the lower backbone
(cross-entropy of a linear-probed head on labeled digits), and compares each solver's ``x`` with
``x*``: relative error ``||x - x*|| / ||x*||`` and relative residual ``||v - A x|| / ||v||``.
docs/design.md §2.3 quotes the table this prints.

``python -m bissl_fast.experiments.solve_accuracy --widths 8,16 16,32 --pretrain-steps 0 200``
(methods ``none`` = no solve, ``x = v``; ``cg-layerwise:K`` the paper's; ``cg-global:K``;
``minres:K``; ``K`` Hessian products each). The largest cost is the dense Hessian: ``P`` products
for ``P`` parameters (4952 for widths 8-16, 19376 for 16-32) and ``8 P^2`` bytes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .._progress import progress_bar
from .._provenance import provenance
from ..data.tensors import BatchAugment, load_digits, normalize_stats
from ..solver import HessianOperator, ImplicitGradient
from ..solver.spectrum import lanczos_ritz_values
from ..train.heads import Classifier
from ..train.losses import simclr_loss
from ..train.models import PretextModel, SmallResNet
from .demo_training import linear_probe

DEFAULT_METHODS = ("none", "cg-layerwise:5", "cg-global:5", "minres:5", "minres:10")


@dataclass
class Problem:
    """One BiSSL system: the pretext loss on a fixed batch, the backbone parameters, and ``v``."""

    model: PretextModel
    views: tuple[torch.Tensor, torch.Tensor]
    v: tuple[torch.Tensor, ...]

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.backbone.parameters())

    def loss(self) -> torch.Tensor:
        z = torch.cat([self.model.head(self.model.backbone(view)) for view in self.views])
        return simclr_loss(z, 0.5, 2, "auto")


def build_problem(widths: Sequence[int], pretrain_steps: int, batch: int = 64, seed: int = 0) -> Problem:
    """The backbone after ``pretrain_steps`` SimCLR steps (AdamW lr 2e-3, batches of 128 digits, the demo's
    views), the Hessian batch (``batch`` digits x 2 views) and ``v`` (downstream gradient on ``batch`` labeled
    digits through a linear-probed head). Everything in float64, determined by ``seed``."""
    data = load_digits(size=None)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.y.numel(), generator=gen)
    labeled, unlabeled = order[:batch], order[batch:]
    mean, std = normalize_stats(data.x[unlabeled])
    x = ((data.x - mean) / std).double()
    torch.manual_seed(seed)
    backbone = SmallResNet(1, widths=tuple(widths), blocks=(1,) * len(widths))
    model = PretextModel(backbone, backbone.out_dim, proj_dim=64, hidden_dim=128).double()
    augment = BatchAugment()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(pretrain_steps):
        xb = x[unlabeled[torch.randint(unlabeled.numel(), (128,), generator=gen)]]
        views = augment.views(xb, 2, generator=gen)
        loss = simclr_loss(torch.cat([model.head(model.backbone(view)) for view in views]), 0.5, 2, "auto")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    hessian_batch = x[unlabeled[torch.randperm(unlabeled.numel(), generator=gen)[:batch]]]
    views = tuple(augment.views(hessian_batch, 2, generator=gen))
    classifier = Classifier(copy.deepcopy(model.backbone), backbone.out_dim, data.num_classes).double()
    x_lab, y_lab = x[labeled], data.y[labeled]
    linear_probe(classifier, x_lab, y_lab)
    model.train()
    # v: the downstream loss through the lower backbone (train mode, as in BiSSL's upper step).
    ce = F.cross_entropy(classifier.head(model.backbone(x_lab)), y_lab)
    v = tuple(g.detach() for g in torch.autograd.grad(ce, tuple(model.backbone.parameters())))
    return Problem(model, views, v)  # type: ignore[arg-type]


def dense_hessian(op: HessianOperator, block: int = 128, progress: bool | None = None) -> torch.Tensor:
    """``H`` as a dense ``[P, P]`` float64 matrix, ``block`` columns per batched product, symmetrized;
    ``progress`` as in :func:`bissl_fast._progress.progress_bar` (columns done)."""
    params = op.params
    n = sum(p.numel() for p in params)
    h = torch.empty(n, n, dtype=torch.float64)
    bar = progress_bar(n, f"dense Hessian (P = {n})", progress, unit="column")
    for start in range(0, n, block):
        k = min(block, n - start)
        eye = torch.zeros(k, n, dtype=torch.float64)
        eye[torch.arange(k), start + torch.arange(k)] = 1.0
        tangents, offset = [], 0
        for p in params:
            tangents.append(eye[:, offset : offset + p.numel()].reshape(k, *p.shape).to(p.dtype))
            offset += p.numel()
        h[:, start : start + k] = torch.cat([t.reshape(k, -1) for t in op.matmat(tuple(tangents))], dim=1).T.double()
        if bar is not None:
            bar.update(k)
    if bar is not None:
        bar.close()
    # Symmetrize in blocks (no second P x P copy): the products are symmetric to rounding.
    edges = list(range(0, n, 1024)) + [n]
    for i, (r0, r1) in enumerate(zip(edges, edges[1:])):
        for c0, c1 in zip(edges[i:], edges[i + 1 :]):
            mean = 0.5 * (h[r0:r1, c0:c1] + h[c0:c1, r0:r1].T)
            h[r0:r1, c0:c1] = mean
            h[c0:c1, r0:r1] = mean.T
    return h


def _parse_method(spec: str) -> tuple[str, int]:
    if spec == "none":
        return "none", 0
    name, _, iters = spec.partition(":")
    if name not in ("cg-layerwise", "cg-global", "minres") or not iters.isdigit() or int(iters) < 1:
        raise ValueError(f"method must be 'none' or <cg-layerwise|cg-global|minres>:<iterations>, got {spec!r}")
    return name, int(iters)


@dataclass
class SettingResult:
    """The accuracy of every method on one problem, and the spectrum facts behind it."""

    widths: list[int]
    pretrain_steps: int
    parameters: int
    damping: float
    lam: float
    methods: dict[str, dict[str, float]]
    lambda_min: float
    lambda_max: float
    eigenvalues_below_minus_c: int
    system_min_abs_eigenvalue: float
    system_condition: float
    solution_norm_ratio: float
    lanczos_lambda_min: dict[str, float]


def solve_accuracy(
    widths: Sequence[int], pretrain_steps: int, methods: Sequence[str] = DEFAULT_METHODS, damping: float = 10.0,
    lam: float = 0.001, batch: int = 64, seed: int = 0, progress: bool | None = None,
) -> SettingResult:
    """Relative error and residual of every method in ``methods`` against the exact solution of one problem.

    Besides ``rel_err`` and ``rel_res`` a CG method records ``recursive_res``, the residual its own
    recursion reports (for layerwise CG not ``||v - A x||``). The Lanczos estimates of
    ``lambda_min(H)`` after 10 and 20 products show what ``auto_damping`` (10 products) sees.
    """
    parsed = [(spec, *_parse_method(spec)) for spec in methods]
    prob = build_problem(widths, pretrain_steps, batch, seed)
    c = lam + damping
    with HessianOperator(prob.loss, prob.params) as op:
        # A = I + H / c formed in place: at widths 16-32 one dense copy is 3 GB.
        a = dense_hessian(op, progress=progress).div_(c)
        a.diagonal().add_(1.0)
        flat_v = torch.cat([t.reshape(-1) for t in prob.v])
        exact = torch.linalg.solve(a, flat_v)
        eig_a = torch.linalg.eigvalsh(a)
        eig_h = (eig_a - 1.0) * c
        results: dict[str, dict[str, float]] = {}
        for spec, name, iters in parsed:
            if name == "none":
                x, recursive = flat_v, None
            else:
                method = "minres" if name == "minres" else "cg"
                layerwise = None if method == "minres" else name == "cg-layerwise"
                solver = ImplicitGradient(prob.params, lam=lam, damping=damping, iters=iters, method=method,
                                          layerwise=layerwise, measure_residual=False)
                x = torch.cat([t.reshape(-1) for t in solver.solve(op, prob.v)])
                recursive = solver.last_info.relative_residuals[-1] if method == "cg" else None
            row = {
                "rel_err": float((x - exact).norm() / exact.norm()),
                "rel_res": float((flat_v - a @ x).norm() / flat_v.norm()),
            }
            if recursive is not None:
                row["recursive_res"] = recursive
            results[spec] = row
        lanczos = {f"{k} products": float(lanczos_ritz_values(op, k)[0]) for k in (10, 20)}
    return SettingResult(
        list(widths), pretrain_steps, a.shape[0], damping, lam, results, float(eig_h[0]), float(eig_h[-1]),
        int((eig_h < -c).sum()), float(eig_a.abs().min()), float(eig_a.abs().max() / eig_a.abs().min()),
        float(exact.norm() / flat_v.norm()), lanczos,
    )


def _cell(row: dict[str, float]) -> str:
    return f"{row['rel_err']:.2g} / {row['rel_res']:.2g}"


def format_table(results: Sequence[SettingResult]) -> str:
    """The Markdown table (rows: methods, columns: problems; cells ``rel err / rel res``) and the spectrum facts."""
    def title(r: SettingResult) -> str:
        state = "init" if r.pretrain_steps == 0 else f"after {r.pretrain_steps} pretext steps"
        return f"widths {'-'.join(map(str, r.widths))}, {state}"

    lines = [
        "| method (Hessian products) | " + " | ".join(title(r) for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for spec in results[0].methods:
        label = "no solve, x = v (0)" if spec == "none" else f"{spec.split(':')[0]} ({spec.split(':')[1]})"
        lines.append(f"| {label} | " + " | ".join(_cell(r.methods[spec]) for r in results) + " |")
    lines += ["", "cells: relative error ||x - x*|| / ||x*|| / relative residual ||v - A x|| / ||v||", ""]
    for r in results:
        recursive = {s: m["recursive_res"] for s, m in r.methods.items() if "recursive_res" in m}
        lines.append(
            f"- {title(r)} (P = {r.parameters}, lam + damping = {r.lam + r.damping:g}): lambda(H) in "
            f"[{r.lambda_min:.4g}, {r.lambda_max:.4g}], {r.eigenvalues_below_minus_c} eigenvalues below -(lam + damping); "
            f"smallest |eigenvalue| of A {r.system_min_abs_eigenvalue:.2g}, condition {r.system_condition:.3g}; "
            f"||x*|| / ||v|| = {r.solution_norm_ratio:.3g}; Lanczos estimate of lambda_min(H): "
            + ", ".join(f"{v:.4g} ({k})" for k, v in r.lanczos_lambda_min.items())
            + "; CG's own recursive residual: " + ", ".join(f"{s} {v:.3g}" for s, v in recursive.items())
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bissl_fast.experiments.solve_accuracy [--widths 8,16 ...] [--pretrain-steps 0 200] ...``."""
    p = argparse.ArgumentParser(prog="python -m bissl_fast.experiments.solve_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", nargs="+", default=["8,16"], help="backbone stage widths per problem, e.g. 8,16 16,32")
    p.add_argument("--pretrain-steps", type=int, nargs="+", default=[0, 200], help="SimCLR steps before the solve")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="none, cg-layerwise:K, cg-global:K, minres:K")
    p.add_argument("--damping", type=float, default=10.0)
    p.add_argument("--lam", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=64, help="digits in the Hessian batch (2 views each) and in v's batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        widths = [[int(w) for w in spec.split(",")] for spec in args.widths]
        for spec in args.methods:
            _parse_method(spec)
    except ValueError as exc:
        p.error(str(exc))
    if not args.damping + args.lam > 0 or args.batch < 2 or any(s < 0 for s in args.pretrain_steps):
        p.error("need lam + damping > 0, --batch >= 2 and --pretrain-steps >= 0")
    produced_by = provenance()
    results = [
        solve_accuracy(w, steps, args.methods, args.damping, args.lam, args.batch, args.seed, progress=True)
        for w in widths for steps in args.pretrain_steps
    ]
    print(format_table(results))
    if args.json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"provenance": produced_by, "args": vars(args),
                       "results": [asdict(r) for r in results]}, f, indent=1)
    return 0 if all(math.isfinite(r.lambda_min) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
