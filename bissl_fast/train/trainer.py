"""The BiSSL bilevel stage (docs/design.md §2.4): alternating pretext (lower) and downstream (upper) training.

One *stage* (the paper's "epoch") is

- a **lower stage** of ``lower_iters`` steps minimizing
  ``L_P(theta_P) + (lam/2) ||theta_P - theta_D||^2`` (``theta_D`` detached; one ``lam_t`` per
  parameter tensor when ``config.lam`` is a sequence) with gradient clipping;
- an **upper stage** of ``upper_iters`` steps on ONE fixed lower batch. Each step takes a fresh
  downstream batch ``(x, y)`` and sets

      grad(theta_D) = IJ-solve( dL_D(head_D(backbone_P(x))) / dtheta_P ) + dL_D(head_D(backbone_D(x))) / dtheta_D
      grad(head_D)  = sum of the head gradients of both terms

  where IJ-solve is ``(I + H / (lam + damping))^-1`` by a few CG iterations, ``H`` the Hessian of
  ``L_P`` w.r.t. ``theta_P`` on the fixed lower batch; then clipping and an upper optimizer step.

``L_P`` runs every view through the lower model (and BYOL's target) in its own forward pass, so
BatchNorm normalizes each view with its own statistics as in the paper (``concat_views=True``
runs one forward on the concatenated views instead).

Because ``theta_P`` and the lower batch do not change during the upper stage, ``H`` is one operator
for every CG iteration of every upper step: with ``solver="reuse"`` the trainer builds
:class:`bissl_fast.solver.HessianOperator` once per upper stage (first-order graph built once,
BYOL target outputs computed once), and ``solver="recompute"`` calls the paper-style
:func:`bissl_fast.reference.implicit_grad` that redoes forward + gradient for every product.

Distributed (``torch.distributed`` initialized, e.g. under ``torchrun``): gradients of both levels
are averaged over ranks with one bucketed all-reduce (what DDP computes), SimCLR embeddings are
all-gathered so the NT-Xent loss is the global-batch loss, and the solver averages ``v`` and every
Hessian product over ranks. Each rank must see its own slice of the global batch
(:class:`bissl_fast.data.tensors.TensorLoader` with ``rank``/``world_size`` does that). BatchNorm uses
per-rank batch statistics, as in DDP without SyncBatchNorm.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import bucketed_mean, rank
from .._progress import progress_bar
from .._types import Tensors
from .._validation import check_int_at_least
from .config import BiSSLConfig
from .ema import EMATarget
from .losses import byol_pair_loss, simclr_loss
from .resume import BatchStream, rng_state, set_rng_state
from .stage import FrozenBuffers, StageLog, implicit_solver, solve_quality

if TYPE_CHECKING:
    from ..solver import SolveReport


def _use_fused_batchnorm(setting: bool | str, model: nn.Module) -> bool:
    if setting != "auto":
        return bool(setting)
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cpu"


def _module_attr(model: nn.Module, attr: str, model_name: str, hint: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{model_name} must be a torch.nn.Module, got {type(model).__name__}")
    sub = getattr(model, attr, None)
    if not isinstance(sub, nn.Module):
        raise TypeError(f"{model_name} must have an nn.Module attribute .{attr} ({hint}); got {type(sub).__name__}")
    return sub


class BiSSLTrainer:
    """Bilevel (BiSSL) training of a pretext model and a downstream model (docs/design.md §2.4).

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
            model when omitted. It moves by EMA toward the online network at the start of each
            lower step (the paper's order), and only then.

    ``train_stage()`` runs one lower + upper stage and appends a :class:`StageLog` to ``self.log``;
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
        if _use_fused_batchnorm(self.config.fused_batchnorm, lower_model):
            from ..nn import convert_batchnorm

            convert_batchnorm(lower_model)

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
        if isinstance(self.config.lam, tuple) and len(self.config.lam) != len(self.lower_params):
            raise ValueError(
                f"config.lam has {len(self.config.lam)} values; a per-tensor lam needs one per backbone "
                f"parameter tensor ({len(self.lower_params)})"
            )

        if byol:
            if target_model is None:
                target_model = copy.deepcopy(lower_model)
            self.target_backbone = _module_attr(target_model, "backbone", "target_model", "the BYOL target backbone")
            self.target_head = _module_attr(target_model, "head", "target_model", "the BYOL target projector")
            self.target_model: nn.Module | None = target_model
            self.ema: EMATarget | None = EMATarget(
                [self.lower_backbone, self.lower_head], [self.target_backbone, self.target_head], self.config.byol_momentum
            )
        else:
            self.target_model = None
            self.ema = None

        for name, opt in (("lower_optimizer", lower_optimizer), ("upper_optimizer", upper_optimizer)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        self.lower_optimizer, self.upper_optimizer = lower_optimizer, upper_optimizer
        self.lower_scheduler, self.upper_scheduler = lower_scheduler, upper_scheduler
        self.lower_stream = BatchStream(lower_loader, "lower_loader")
        self.upper_stream = BatchStream(upper_loader, "upper_loader")
        self.lower_transform, self.upper_transform = lower_transform, upper_transform
        self.downstream_loss = downstream_loss if downstream_loss is not None else F.cross_entropy
        self.stage = 0
        self.lower_step = 0
        self.upper_step = 0
        self.log: list[StageLog] = []
        self._bar: Any = None  # the progress bar of a running fit()

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

    def _forward_views(self, fn: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]) -> Tensors:
        """``fn`` of every view: one call per view (BatchNorm statistics per view) or one on their concatenation."""
        if self.config.concat_views:
            return tuple(fn(torch.cat(list(views))).chunk(len(views)))
        return tuple(fn(v) for v in views)

    @torch.no_grad()
    def _targets(self, views: Sequence[torch.Tensor]) -> Tensors | None:
        """BYOL target projections of the views (no grad), or None for SimCLR."""
        if self.target_model is None:
            return None
        return self._forward_views(lambda x: self.target_head(self.target_backbone(x)), views)

    def pretext_loss(self, views: Sequence[torch.Tensor], targets: Tensors | None = None) -> torch.Tensor:
        """``L_P`` on one lower batch: NT-Xent of ``head(backbone(view))`` or BYOL against ``targets``.

        Each view runs through the model on its own unless ``config.concat_views``.
        """
        cfg = self.config
        if cfg.pretext == "simclr":
            z = self._forward_views(lambda x: self.lower_head(self.lower_backbone(x)), views)
            return simclr_loss(torch.cat(z), cfg.temperature, len(views), cfg.backend)
        if targets is None:
            raise ValueError("BYOL's pretext loss needs the target projections")
        p1, p2 = self._forward_views(lambda x: self.predictor(self.lower_head(self.lower_backbone(x))), views)  # type: ignore[misc]
        return byol_pair_loss(p1, p2, targets[0], targets[1], cfg.backend)

    def _proximal_term(self) -> torch.Tensor:
        """``sum_t (lam_t/2) ||theta_P,t - theta_D,t||^2`` with ``theta_D`` detached."""
        lam = self.config.lam
        squares = [((p - q.detach()) ** 2).sum() for p, q in zip(self.lower_params, self.upper_params)]
        if isinstance(lam, tuple):
            return sum(0.5 * lam_t * sq for lam_t, sq in zip(lam, squares))
        return 0.5 * lam * sum(squares)

    # ---------------------------------------------------------------- steps

    def _lower_step(self) -> float:
        cfg = self.config
        views = self._views(self.lower_stream.next())
        if self.ema is not None:
            # The paper moves the target at the start of each lower step, toward the online weights
            # as they are: an upper stage then sees the target before the last lower step's move
            # (docs/design.md §2.4). Moving it after the step changes the stage (tested).
            self.ema.update(cfg.byol_momentum)
        loss_p = self.pretext_loss(views, self._targets(views))
        loss = loss_p + self._proximal_term()
        self.lower_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.lower_model.parameters() if p.grad is not None]
        for p, g in zip(params, bucketed_mean([p.grad for p in params])):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        self.lower_optimizer.step()
        if self.lower_scheduler is not None:
            self.lower_scheduler.step()
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
        averaged = bucketed_mean(direct + head_lp)
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

    # ---------------------------------------------------------------- stages

    def train_stage(self) -> StageLog:
        """One BiSSL stage (lower stage, then upper stage); returns and logs its summary.

        The upper stage draws its fixed lower batch from the lower loader (``lower_iters + 1``
        lower batches per stage) and leaves the lower model and the BYOL target unchanged,
        BatchNorm running statistics included. The fields of the entry are described in
        :class:`StageLog`.
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
        reports: list[SolveReport] = []
        if cfg.upper_iters > 0:
            with FrozenBuffers(self.lower_model, self.target_model):
                views = self._views(self.lower_stream.next())
                samples = views[0].shape[0]
                targets = self._targets(views)  # BYOL: once per operator, never inside a product

                def loss_fn() -> torch.Tensor:
                    return self.pretext_loss(views, targets)

                with implicit_solver(loss_fn, self.lower_params, cfg, reports) as solve:
                    for _ in range(cfg.upper_iters):
                        upper_losses.append(self._upper_step(solve))
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(stage=self.stage, upper_loss=f"{upper_losses[-1]:.4f}")
        t2 = time.perf_counter()
        quality = solve_quality(reports, cfg)
        entry = StageLog(
            stage=self.stage,
            lower_loss=statistics.fmean(lower_losses) if lower_losses else None,
            lower_losses=lower_losses,
            upper_loss=statistics.fmean(upper_losses) if upper_losses else None,
            upper_losses=upper_losses,
            lower_time_s=t1 - t0,
            upper_time_s=t2 - t1,
            lower_steps_per_s=cfg.lower_iters / max(t1 - t0, 1e-12),
            upper_steps_per_s=cfg.upper_iters / max(t2 - t1, 1e-12),
            hvp_per_s=quality["hessian_products"] / max(t2 - t1, 1e-12),
            lower_batch_size=samples,
            **quality,
        )
        self.stage += 1
        self.log.append(entry)
        return entry

    def fit(self, stages: int) -> list[StageLog]:
        """Run ``stages`` BiSSL stages (progress on rank 0 as ``config.progress`` asks); returns their logs."""
        check_int_at_least("stages", stages, 0)
        if rank() == 0:
            total = stages * (self.config.lower_iters + self.config.upper_iters)
            self._bar = progress_bar(total, "BiSSL", self.config.progress)
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
            "rng": rng_state(),
            "log": [entry.as_dict() for entry in self.log],
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
        set_rng_state(state["rng"])
        self.log = [StageLog.from_dict(copy.deepcopy(entry)) for entry in state["log"]]


__all__ = ["BiSSLTrainer"]
