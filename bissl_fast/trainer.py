"""The BiSSL bilevel stage (DESIGN §2.4): alternating pretext (lower) and downstream (upper) training.

One *stage* (the paper's "epoch") is

- a **lower stage** of ``lower_iters`` steps minimizing
  ``L_P(theta_P) + (lam/2) ||theta_P - theta_D||^2`` (``theta_D`` detached) with gradient clipping;
- an **upper stage** of ``upper_iters`` steps on ONE fixed lower batch. Each step takes a fresh
  downstream batch ``(x, y)`` and sets

      grad(theta_D) = IJ-solve( dL_D(head_D(backbone_P(x))) / dtheta_P ) + dL_D(head_D(backbone_D(x))) / dtheta_D
      grad(head_D)  = sum of the head gradients of both terms

  where IJ-solve is ``(I + H / (lam + damping))^-1`` by a few CG iterations, ``H`` the Hessian of
  ``L_P`` w.r.t. ``theta_P`` on the fixed lower batch; then clipping and an upper optimizer step.

Because ``theta_P`` and the lower batch do not change during the upper stage, ``H`` is one operator
for every CG iteration of every upper step: with ``solver="reuse"`` the trainer builds
:class:`bissl_fast.solver.HessianOperator` once per upper stage (first-order graph built once,
BYOL target outputs computed once), and ``solver="recompute"`` calls the paper-style
:func:`bissl_fast.reference.implicit_grad` that redoes forward + gradient for every product.

Distributed (``torch.distributed`` initialized, e.g. under ``torchrun``): gradients of both levels
are averaged over ranks with one bucketed all-reduce (what DDP computes), SimCLR embeddings are
all-gathered so the NT-Xent loss is the global-batch loss, and the solver averages ``v`` and every
Hessian product over ranks. Each rank must see its own slice of the global batch
(:class:`bissl_fast.data.TensorLoader` with ``rank``/``world_size`` does that). BatchNorm uses
per-rank batch statistics, as in DDP without SyncBatchNorm.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import reference
from ._validation import check_int_at_least, check_nonnegative, check_positive

Tensors = tuple[torch.Tensor, ...]

_PRETEXTS = ("simclr", "byol")
_SOLVERS = ("reuse", "recompute")


@dataclass
class BiSSLConfig:
    """Hyper-parameters of the BiSSL stage; defaults are the paper's.

    pretext: ``"simclr"`` (NT-Xent over ``m`` views) or ``"byol"`` (2 views, EMA target network).
    lower_iters / upper_iters: steps of each level per stage (20 / 8).
    lam: weight of the proximal term ``(lam/2)||theta_P - theta_D||^2`` and of the IJ system.
    damping: added to ``lam`` in ``(I + H/(lam + damping)) x = v``.
    cg_iters / layerwise: CG iterations and per-tensor (layerwise) or global CG scalars.
    clip_norm: max total gradient norm of each level's step.
    temperature: NT-Xent temperature. byol_momentum: EMA rate of the BYOL target network.
    solver: ``"reuse"`` (Hessian operator built once per upper stage) or ``"recompute"`` (paper).
    backend: backend of the fused losses (``"auto" | "torch" | "cpp" | "triton" | "cuda"``).
    progress: show a tqdm bar (rank 0 only).
    """

    pretext: str = "simclr"
    lower_iters: int = 20
    upper_iters: int = 8
    lam: float = 0.001
    damping: float = 10.0
    cg_iters: int = 5
    layerwise: bool = True
    clip_norm: float = 10.0
    temperature: float = 0.5
    byol_momentum: float = 0.99
    solver: str = "reuse"
    backend: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.pretext not in _PRETEXTS:
            raise ValueError(f"pretext must be one of {_PRETEXTS}, got {self.pretext!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        check_int_at_least("lower_iters", self.lower_iters, 0)
        check_int_at_least("upper_iters", self.upper_iters, 0)
        check_int_at_least("cg_iters", self.cg_iters, 1)
        check_nonnegative("lam", self.lam)
        check_nonnegative("damping", self.damping)
        check_positive("lam + damping", self.lam + self.damping)
        check_positive("clip_norm", self.clip_norm)
        check_positive("temperature", self.temperature)
        m = check_nonnegative("byol_momentum", self.byol_momentum)
        if m > 1:
            raise ValueError(f"byol_momentum must be in [0, 1], got {m}")


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _mean_over_ranks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rank-mean of every tensor with one all-reduce for the list (what DDP does to gradients)."""
    tensors = list(tensors)
    if not _distributed() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


# --------------------------------------------------------------------------------------------
# Loss selection: fused ops when present, references otherwise
# --------------------------------------------------------------------------------------------


def _nt_xent(z: torch.Tensor, temperature: float, views: int, backend: str) -> torch.Tensor:
    """Fused NT-Xent of view-major ``z`` ``[m*b, D]``; in distributed runs over the gathered global batch."""
    from .ops.nt_xent import nt_xent

    return nt_xent(z, temperature=temperature, views=views, backend=backend, gather=_distributed())


def _byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, backend: str) -> torch.Tensor:
    """Fused BYOL loss (DESIGN §2.2) when :mod:`bissl_fast.ops.byol` is built, else the reference (same value)."""
    try:
        from .ops.byol import byol_loss
    except ImportError:
        return reference.byol_loss(p1, p2, t1, t2)
    return byol_loss(p1, p2, t1, t2, backend=backend)


# --------------------------------------------------------------------------------------------
# RNG and data-stream state
# --------------------------------------------------------------------------------------------


def _loader_generators(loader: Any) -> list[torch.Generator]:
    found = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


class _BatchStream:
    """Endless batches from a loader, with a checkpointable position.

    Loaders with ``state_dict``/``load_state_dict`` (e.g. :class:`bissl_fast.data.TensorLoader`)
    save their own position. For any other iterable (e.g. ``torch.utils.data.DataLoader``) the
    stream records torch's global RNG state and the loader's generators at the moment the current
    pass started (a shuffling sampler and worker seeds draw from them in ``iter()``) plus the
    number of batches consumed; resuming replays that ``iter()`` and skips the consumed batches.
    """

    def __init__(self, loader: Iterable[Any], name: str) -> None:
        if not isinstance(loader, Iterable):
            raise TypeError(f"{name} must be an iterable of batches, got {type(loader).__name__}")
        self.loader, self.name = loader, name
        self.stateful = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
        self._it: Iterator[Any] | None = None
        self._pass_rng: dict[str, Any] | None = None
        self.consumed = 0

    def _start_pass(self) -> None:
        if not self.stateful:
            self._pass_rng = {
                "torch": torch.get_rng_state(),
                "generators": [g.get_state() for g in _loader_generators(self.loader)],
            }
            self.consumed = 0
        self._it = iter(self.loader)

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._start_pass()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self._it = None
                continue
            self.consumed += 1
            return batch
        raise ValueError(f"{self.name} yielded no batches")

    def state_dict(self) -> dict[str, Any]:
        if self.stateful:
            return {"loader": self.loader.state_dict()}  # type: ignore[attr-defined]
        return {"active": self._it is not None, "pass_rng": self._pass_rng, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._it = None
        if self.stateful:
            self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
            return
        self.consumed = 0
        if not state["active"]:
            return
        # Replay the interrupted pass: same RNG at iter() time, then skip what was consumed.
        # The trainer restores the global RNG state after this, so the replay leaves no trace.
        self._pass_rng = state["pass_rng"]
        torch.set_rng_state(self._pass_rng["torch"])
        gens = _loader_generators(self.loader)
        if len(gens) != len(self._pass_rng["generators"]):
            raise ValueError(f"{self.name} has {len(gens)} generators, the checkpoint {len(self._pass_rng['generators'])}")
        for g, s in zip(gens, self._pass_rng["generators"]):
            g.set_state(s)
        self._it = iter(self.loader)
        for i in range(int(state["consumed"])):
            try:
                next(self._it)
            except StopIteration as exc:
                raise ValueError(f"{self.name} ended after {i} batches while resuming at batch {state['consumed']}") from exc
        self.consumed = int(state["consumed"])


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _FrozenBuffers:
    """Restores the buffers (BatchNorm running stats) of the given modules on exit.

    The upper stage runs the lower model (for ``v``, for every recomputed Hessian product) and the
    BYOL target (for the fixed batch's targets) forward, but must change neither: only lower
    steps do.
    """

    def __init__(self, *modules: nn.Module | None) -> None:
        self.modules = [m for m in modules if m is not None]

    def __enter__(self) -> None:
        self.saved = [(b, b.detach().clone()) for m in self.modules for b in m.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for b, saved in self.saved:
                b.copy_(saved)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def _module_attr(model: nn.Module, attr: str, model_name: str, hint: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{model_name} must be a torch.nn.Module, got {type(model).__name__}")
    sub = getattr(model, attr, None)
    if not isinstance(sub, nn.Module):
        raise TypeError(f"{model_name} must have an nn.Module attribute .{attr} ({hint}); got {type(sub).__name__}")
    return sub


class BiSSLTrainer:
    """Bilevel (BiSSL) training of a pretext model and a downstream model (DESIGN §2.4).

    Args:
        lower_model: pretext model with ``.backbone`` and ``.head`` (projector); for BYOL also
            ``.predictor``. The pretext embedding is ``head(backbone(x))`` (SimCLR) and
            ``predictor(head(backbone(x)))`` (BYOL).
        upper_model: downstream model with ``.backbone`` (same parameter shapes as the lower
            backbone) and ``.head``; predictions are ``head(backbone(x))``.
        lower_loader: iterable of lower batches. Without ``lower_transform`` a batch must be a
            tuple/list of ``m >= 2`` view tensors ``[b, C, H, W]`` (BYOL: exactly 2).
        upper_loader: iterable of ``(x, y)`` downstream batches.
        lower_optimizer / upper_optimizer: optimizers over the lower / upper model parameters.
        config: :class:`BiSSLConfig` (paper defaults when omitted).
        lower_scheduler / upper_scheduler: optional LR schedulers, stepped after every optimizer
            step of their level.
        lower_transform: maps a lower-loader batch to its list of views (e.g. augmentations;
            random draws should use torch's global generator, which checkpoints save).
        upper_transform: maps downstream inputs ``x`` to augmented inputs.
        downstream_loss: ``loss(predictions, y) -> scalar``, differentiable; cross-entropy by default.
        target_model: BYOL target network (``.backbone``, ``.head``); a deep copy of the lower
            model when omitted. It is updated by EMA after each lower step only.

    ``train_stage()`` runs one lower + upper stage and appends a dict to ``self.log``;
    ``fit(stages)`` runs several. ``state_dict()`` / ``load_state_dict()`` cover models,
    optimizers, schedulers, counters, RNG states and loader positions, so a run resumed from a
    checkpoint taken between stages ends bit-identical to an uninterrupted one.
    """

    def __init__(
        self,
        lower_model: nn.Module,
        upper_model: nn.Module,
        lower_loader: Iterable[Any],
        upper_loader: Iterable[Any],
        lower_optimizer: torch.optim.Optimizer,
        upper_optimizer: torch.optim.Optimizer,
        config: BiSSLConfig | None = None,
        *,
        lower_scheduler: Any = None,
        upper_scheduler: Any = None,
        lower_transform: Callable[[Any], Sequence[torch.Tensor]] | None = None,
        upper_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        downstream_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        target_model: nn.Module | None = None,
    ) -> None:
        self.config = config if config is not None else BiSSLConfig()
        if not isinstance(self.config, BiSSLConfig):
            raise TypeError(f"config must be a BiSSLConfig, got {type(self.config).__name__}")
        byol = self.config.pretext == "byol"
        self.lower_backbone = _module_attr(lower_model, "backbone", "lower_model", "the pretext backbone")
        self.lower_head = _module_attr(lower_model, "head", "lower_model", "the pretext projector")
        self.predictor = _module_attr(lower_model, "predictor", "lower_model", "BYOL's predictor MLP") if byol else None
        self.upper_backbone = _module_attr(upper_model, "backbone", "upper_model", "the downstream backbone")
        self.upper_head = _module_attr(upper_model, "head", "upper_model", "the downstream head")
        self.lower_model, self.upper_model = lower_model, upper_model

        self.lower_params: Tensors = tuple(self.lower_backbone.parameters())
        self.upper_params: Tensors = tuple(self.upper_backbone.parameters())
        self.head_params: Tensors = tuple(self.upper_head.parameters())
        if not self.lower_params:
            raise ValueError("lower_model.backbone has no parameters")
        if len(self.lower_params) != len(self.upper_params):
            raise ValueError(
                f"lower and upper backbones must have the same parameters; got {len(self.lower_params)} "
                f"and {len(self.upper_params)} tensors"
            )
        names_l = [n for n, _ in self.lower_backbone.named_parameters()]
        for i, (p, q) in enumerate(zip(self.lower_params, self.upper_params)):
            if p.shape != q.shape:
                raise ValueError(
                    f"backbone parameter {i} ({names_l[i]}) has shape {tuple(p.shape)} in lower_model "
                    f"and {tuple(q.shape)} in upper_model; the backbones must have identical architectures"
                )
            if not p.requires_grad or not q.requires_grad:
                raise ValueError(f"backbone parameter {i} ({names_l[i]}) must require grad in both models")

        if byol:
            if target_model is None:
                target_model = copy.deepcopy(lower_model)
            self.target_backbone = _module_attr(target_model, "backbone", "target_model", "the BYOL target backbone")
            self.target_head = _module_attr(target_model, "head", "target_model", "the BYOL target projector")
            self.target_model: nn.Module | None = target_model
            self._ema_pairs = list(zip(
                list(self.target_backbone.parameters()) + list(self.target_head.parameters()),
                list(self.lower_backbone.parameters()) + list(self.lower_head.parameters()),
            ))
            for t, _ in self._ema_pairs:
                t.requires_grad_(False)
        else:
            self.target_model = None

        for name, opt in (("lower_optimizer", lower_optimizer), ("upper_optimizer", upper_optimizer)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        self.lower_optimizer, self.upper_optimizer = lower_optimizer, upper_optimizer
        self.lower_scheduler, self.upper_scheduler = lower_scheduler, upper_scheduler
        self.lower_stream = _BatchStream(lower_loader, "lower_loader")
        self.upper_stream = _BatchStream(upper_loader, "upper_loader")
        self.lower_transform, self.upper_transform = lower_transform, upper_transform
        self.downstream_loss = downstream_loss if downstream_loss is not None else F.cross_entropy
        self.stage = 0
        self.lower_step = 0
        self.upper_step = 0
        self.log: list[dict[str, Any]] = []
        self._bar: Any = None  # the tqdm bar of a running fit()

    # ---------------------------------------------------------------- losses

    def _views(self, batch: Any) -> list[torch.Tensor]:
        views = self.lower_transform(batch) if self.lower_transform is not None else batch
        if (
            isinstance(views, torch.Tensor)
            or not isinstance(views, (tuple, list))
            or len(views) < 2
            or not all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == views[0].shape for v in views)
        ):
            raise TypeError(
                "a lower batch must be a tuple/list of >= 2 floating view tensors of one shape "
                f"(or pass lower_transform to make views), got {type(views).__name__}"
            )
        if self.config.pretext == "byol" and len(views) != 2:
            raise ValueError(f"BYOL uses exactly 2 views, got {len(views)}")
        return list(views)

    @torch.no_grad()
    def _targets(self, views: Sequence[torch.Tensor]) -> Tensors | None:
        """BYOL target projections of the views (no grad), or None for SimCLR."""
        if self.target_model is None:
            return None
        t = self.target_head(self.target_backbone(torch.cat(list(views))))
        return tuple(t.chunk(len(views)))

    def pretext_loss(self, views: Sequence[torch.Tensor], targets: Tensors | None = None) -> torch.Tensor:
        """``L_P`` on one lower batch: NT-Xent of ``head(backbone(views))`` or BYOL against ``targets``."""
        cfg = self.config
        h = self.lower_head(self.lower_backbone(torch.cat(list(views))))
        if cfg.pretext == "simclr":
            return _nt_xent(h, cfg.temperature, len(views), cfg.backend)
        if targets is None:
            raise ValueError("BYOL's pretext loss needs the target projections")
        p1, p2 = self.predictor(h).chunk(2)  # type: ignore[misc]
        return _byol_loss(p1, p2, targets[0], targets[1], cfg.backend)

    # ---------------------------------------------------------------- steps

    def _lower_step(self) -> float:
        cfg = self.config
        views = self._views(self.lower_stream.next())
        loss_p = self.pretext_loss(views, self._targets(views))
        prox = sum(((p - q.detach()) ** 2).sum() for p, q in zip(self.lower_params, self.upper_params))
        loss = loss_p + 0.5 * cfg.lam * prox
        self.lower_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.lower_model.parameters() if p.grad is not None]
        for p, g in zip(params, _mean_over_ranks([p.grad for p in params])):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        self.lower_optimizer.step()
        if self.lower_scheduler is not None:
            self.lower_scheduler.step()
        if self.target_model is not None:
            with torch.no_grad():
                m = cfg.byol_momentum
                for t, o in self._ema_pairs:
                    t.mul_(m).add_(o.detach(), alpha=1 - m)
        self.lower_step += 1
        return float(loss_p.detach())

    def _upper_step(self, solve: Callable[[Tensors], Tensors]) -> float:
        cfg = self.config
        batch = self.upper_stream.next()
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"an upper batch must be a tuple (x, y), got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if self.upper_transform is not None:
            x = self.upper_transform(x)
        n_b, n_h = len(self.lower_params), len(self.head_params)
        # Downstream loss through the lower backbone: v = dL_D/dtheta_P (and a head gradient).
        loss_lp = self.downstream_loss(self.upper_head(self.lower_backbone(x)), y)
        g_lp = torch.autograd.grad(loss_lp, self.lower_params + self.head_params, allow_unused=True)
        # Downstream loss through the upper backbone: the direct gradient.
        loss_d = self.downstream_loss(self.upper_head(self.upper_backbone(x)), y)
        g_d = torch.autograd.grad(loss_d, self.upper_params + self.head_params, allow_unused=True)
        v = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(g_lp[:n_b], self.lower_params))
        ij = solve(v)  # rank-averages v and every Hessian product itself
        direct = [torch.zeros_like(p) if g is None else g for g, p in zip(g_d, self.upper_params + self.head_params)]
        head_lp = [torch.zeros_like(p) if g is None else g for g, p in zip(g_lp[n_b:], self.head_params)]
        averaged = _mean_over_ranks(direct + head_lp)
        for i, p in enumerate(self.upper_params):
            p.grad = ij[i] + averaged[i]
        for j, p in enumerate(self.head_params):
            p.grad = averaged[n_b + j] + averaged[n_b + n_h + j]
        torch.nn.utils.clip_grad_norm_(self.upper_params + self.head_params, cfg.clip_norm)
        self.upper_optimizer.step()
        self.upper_optimizer.zero_grad(set_to_none=True)
        if self.upper_scheduler is not None:
            self.upper_scheduler.step()
        self.upper_step += 1
        return float(loss_d.detach())

    def _make_solver(self, loss_fn: Callable[[], torch.Tensor], residuals: list[float]) -> tuple[Callable[[Tensors], Tensors], Callable[[], None]]:
        """``(solve, release)`` of the IJ system ``(I + H/(lam + damping)) x = v`` for this upper stage.

        ``"reuse"`` builds one :class:`~bissl_fast.solver.HessianOperator` for the whole stage and
        appends each solve's final relative CG residual to ``residuals``; ``"recompute"`` is the
        paper-style reference (no residuals: it does not report them).
        """
        cfg = self.config
        if cfg.solver == "recompute":
            def solve(v: Tensors) -> Tensors:
                return reference.implicit_grad(loss_fn, self.lower_params, v, cfg.lam, cfg.damping, cfg.cg_iters, cfg.layerwise)

            return solve, lambda: None

        from .solver import HessianOperator, ImplicitGradient

        # Reverse-over-reverse on the retained graph: the fused losses are autograd.Functions
        # without torch.func support, which the operator's forward-over-reverse mode needs.
        op = HessianOperator(loss_fn, self.lower_params, mode="rev-rev")
        ig = ImplicitGradient(self.lower_params, lam=cfg.lam, damping=cfg.damping, iters=cfg.cg_iters, layerwise=cfg.layerwise)

        def solve_reuse(v: Tensors) -> Tensors:
            x, info = ig.solve(op, v, return_info=True)
            residuals.append(info.relative_residuals[-1])
            return x

        return solve_reuse, op.release

    # ---------------------------------------------------------------- stages

    def train_stage(self) -> dict[str, Any]:
        """One BiSSL stage (lower stage, then upper stage); returns and logs its summary.

        The upper stage draws its fixed lower batch from the lower loader (``lower_iters + 1``
        lower batches per stage) and leaves the lower model and the BYOL target unchanged,
        BatchNorm running statistics included. The log entry has: ``stage``, ``lower_loss`` /
        ``upper_loss`` (means; the upper one is ``L_D`` through the upper backbone) and the
        per-step ``lower_losses`` / ``upper_losses``, ``cg_relative_residuals`` (final
        ``||r|| / ||v||`` of each upper step's CG; empty for ``solver="recompute"``, whose
        reference does not report it), ``lower_time_s``, ``upper_time_s``, ``lower_steps_per_s``,
        ``upper_steps_per_s``, ``hvp_per_s`` (Hessian products per second in the upper stage) and
        ``lower_batch_size`` (per rank).
        """
        cfg = self.config
        self.lower_model.train()
        self.upper_model.train()
        if self.target_model is not None:
            self.target_model.train()
        bar = self._bar
        t0 = time.perf_counter()
        lower_losses = []
        samples = 0
        for _ in range(cfg.lower_iters):
            lower_losses.append(self._lower_step())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage=self.stage, lower_loss=f"{lower_losses[-1]:.4f}")
        t1 = time.perf_counter()

        upper_losses: list[float] = []
        residuals: list[float] = []
        if cfg.upper_iters > 0:
            with _FrozenBuffers(self.lower_model, self.target_model):
                views = self._views(self.lower_stream.next())
                samples = views[0].shape[0]
                targets = self._targets(views)  # BYOL: once per operator, never inside a product

                def loss_fn() -> torch.Tensor:
                    return self.pretext_loss(views, targets)

                solve, release = self._make_solver(loss_fn, residuals)
                try:
                    for _ in range(cfg.upper_iters):
                        upper_losses.append(self._upper_step(solve))
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(stage=self.stage, upper_loss=f"{upper_losses[-1]:.4f}")
                finally:
                    release()
        t2 = time.perf_counter()
        entry = {
            "stage": self.stage,
            "lower_loss": float(np.mean(lower_losses)) if lower_losses else None,
            "lower_losses": lower_losses,
            "upper_loss": float(np.mean(upper_losses)) if upper_losses else None,
            "upper_losses": upper_losses,
            "cg_relative_residuals": residuals,
            "lower_time_s": t1 - t0,
            "upper_time_s": t2 - t1,
            "lower_steps_per_s": cfg.lower_iters / max(t1 - t0, 1e-12),
            "upper_steps_per_s": cfg.upper_iters / max(t2 - t1, 1e-12),
            "hvp_per_s": cfg.upper_iters * cfg.cg_iters / max(t2 - t1, 1e-12),
            "lower_batch_size": samples,
        }
        self.stage += 1
        self.log.append(entry)
        return entry

    def fit(self, stages: int) -> list[dict[str, Any]]:
        """Run ``stages`` BiSSL stages (with a tqdm bar on rank 0 if ``config.progress``); returns their logs."""
        check_int_at_least("stages", stages, 0)
        show = self.config.progress and _rank() == 0
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=stages * (self.config.lower_iters + self.config.upper_iters), desc="BiSSL", unit="step")
        try:
            return [self.train_stage() for _ in range(stages)]
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly between stages (models, optimizers, RNG, data position)."""
        state = {
            "config": asdict(self.config),
            "lower_model": self.lower_model.state_dict(),
            "upper_model": self.upper_model.state_dict(),
            "target_model": None if self.target_model is None else self.target_model.state_dict(),
            "lower_optimizer": self.lower_optimizer.state_dict(),
            "upper_optimizer": self.upper_optimizer.state_dict(),
            "lower_scheduler": None if self.lower_scheduler is None else self.lower_scheduler.state_dict(),
            "upper_scheduler": None if self.upper_scheduler is None else self.upper_scheduler.state_dict(),
            "counters": {"stage": self.stage, "lower_step": self.lower_step, "upper_step": self.upper_step},
            "lower_stream": self.lower_stream.state_dict(),
            "upper_stream": self.upper_stream.state_dict(),
            "rng": _rng_state(),
            "log": copy.deepcopy(self.log),
        }
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the trainer must be built with the same architecture and config."""
        if state["config"]["pretext"] != self.config.pretext:
            raise ValueError(f"checkpoint pretext {state['config']['pretext']!r} differs from config.pretext {self.config.pretext!r}")
        self.lower_model.load_state_dict(state["lower_model"])
        self.upper_model.load_state_dict(state["upper_model"])
        if self.target_model is not None:
            if state["target_model"] is None:
                raise ValueError("checkpoint has no BYOL target model")
            self.target_model.load_state_dict(state["target_model"])
        self.lower_optimizer.load_state_dict(state["lower_optimizer"])
        self.upper_optimizer.load_state_dict(state["upper_optimizer"])
        for name, sched in (("lower_scheduler", self.lower_scheduler), ("upper_scheduler", self.upper_scheduler)):
            if (sched is None) != (state[name] is None):
                raise ValueError(f"{name} presence differs between the trainer and the checkpoint")
            if sched is not None:
                sched.load_state_dict(state[name])
        counters = state["counters"]
        self.stage, self.lower_step, self.upper_step = counters["stage"], counters["lower_step"], counters["upper_step"]
        self.lower_stream.load_state_dict(state["lower_stream"])
        self.upper_stream.load_state_dict(state["upper_stream"])
        # Last: replaying a loader pass above draws from the global generator.
        _set_rng_state(state["rng"])
        self.log = copy.deepcopy(state["log"])


__all__ = ["BiSSLConfig", "BiSSLTrainer"]
