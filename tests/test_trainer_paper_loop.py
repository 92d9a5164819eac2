"""BiSSLTrainer against a plain loop of the paper's procedure (docs/design.md §2.4), three stages in float64.

The loop below is the paper's order of operations written out plainly (with the trainer's loss functions and
``bissl_fast.reference``'s recomputing implicit gradient, so both run the same arithmetic): each lower step first moves the BYOL target toward the online weights, then
takes the pretext + proximal step (clipping at 10); each upper step takes the downstream gradient
through the lower backbone, solves the IJ system with products recomputed from scratch, adds the
direct gradient and steps. Two differences are known and deliberate: the trainer restores the
BatchNorm running statistics after the upper stage (the paper's upper-stage forwards update them;
parameters do not depend on them in train mode), and it draws the upper stage's fixed lower batch
from its own stream. The loop does both the trainer's way, so the comparison is of everything else.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyLower, TinyUpper, flip_views, rel_err
from torch import nn

from bissl_fast import reference as R
from bissl_fast.data.tensors import load_digits
from bissl_fast.train.config import BiSSLConfig
from bissl_fast.train.heads import Classifier
from bissl_fast.train.losses import byol_pair_loss, simclr_loss
from bissl_fast.train.models import PretextModel, SmallResNet
from bissl_fast.train.trainer import BiSSLTrainer

LOWER_ITERS, UPPER_ITERS, CG_ITERS, STAGES, LAM, DAMPING, MOMENTUM = 2, 2, 3, 3, 0.001, 10.0, 0.9995


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    yield


@pytest.fixture(scope="module")
def batches():
    digits = load_digits(size=None)
    x, y = digits.x.double(), digits.y
    lower = [x[16 * i : 16 * (i + 1)] for i in range(STAGES * (LOWER_ITERS + 1))]
    upper = [(x[200 + 16 * i : 216 + 16 * i], y[200 + 16 * i : 216 + 16 * i]) for i in range(STAGES * UPPER_ITERS)]
    return lower, upper


def _models(pretext: str, batchnorm: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if batchnorm:
        backbone = SmallResNet(1, widths=(4, 8), blocks=(1, 1))
        lower = PretextModel(backbone, 8, proj_dim=8, hidden_dim=16, predictor=pretext == "byol")
        upper = Classifier(copy.deepcopy(backbone), 8, 10)
    else:
        lower, upper = TinyLower(pretext == "byol"), TinyUpper()
    with torch.no_grad():
        for p in upper.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lower.double(), upper.double()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _trainer_run(pretext: str, batchnorm: bool, batches) -> list[torch.Tensor]:
    lower, upper = _models(pretext, batchnorm)
    config = BiSSLConfig(
        pretext=pretext, lower_iters=LOWER_ITERS, upper_iters=UPPER_ITERS, cg_iters=CG_ITERS, lam=LAM, damping=DAMPING,
        byol_momentum=MOMENTUM, progress=False, solver="recompute",
        # The paper's per-product recompute and PyTorch's BatchNorm kernels, as in the loop: the same arithmetic, so
        # the comparison is of the procedure (graph reuse and the fused kernels agree to rounding, tested elsewhere).
        fused_batchnorm=False,
    )
    trainer = BiSSLTrainer(lower, upper, list(batches[0]), list(batches[1]), _sgd(lower), _sgd(upper), config,
                           lower_transform=flip_views)
    trainer.fit(STAGES)
    return _parameters(trainer.lower_model, trainer.upper_model, trainer.target_model)


def _parameters(*models: nn.Module | None) -> list[torch.Tensor]:
    return [p.detach().clone() for m in models if m is not None for p in m.parameters()]


def _paper_loop(pretext: str, batchnorm: bool, batches, target_moves_first: bool = True) -> list[torch.Tensor]:
    lower, upper = _models(pretext, batchnorm)
    target = copy.deepcopy(lower).requires_grad_(False) if pretext == "byol" else None
    opt_lower, opt_upper = _sgd(lower), _sgd(upper)
    lower_batches, upper_batches = iter(batches[0]), iter(batches[1])

    def move_target() -> None:
        with torch.no_grad():
            for online, tgt in ((lower.backbone, target.backbone), (lower.head, target.head)):
                for o, t in zip(online.parameters(), tgt.parameters()):
                    t.copy_(MOMENTUM * t + (1 - MOMENTUM) * o)

    def pretext_loss(views):
        if target is None:
            return simclr_loss(torch.cat([lower.head(lower.backbone(v)) for v in views]), 0.5, 2, "auto")
        p1, p2 = (lower.predictor(lower.head(lower.backbone(v))) for v in views)
        with torch.no_grad():
            t1, t2 = (target.head(target.backbone(v)) for v in views)
        return byol_pair_loss(p1, p2, t1, t2, "auto")

    lower_params, upper_backbone, head = (tuple(m.parameters()) for m in (lower.backbone, upper.backbone, upper.head))
    for _ in range(STAGES):
        for model in (lower, upper, target):
            if model is not None:
                model.train()
        for _ in range(LOWER_ITERS):
            if target is not None and target_moves_first:
                move_target()
            views = flip_views(next(lower_batches))
            proximal = 0.5 * LAM * sum(((p - q.detach()) ** 2).sum() for p, q in zip(lower_params, upper_backbone))
            loss = pretext_loss(views) + proximal
            opt_lower.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in lower.parameters() if p.grad is not None], 10.0)
            opt_lower.step()
            if target is not None and not target_moves_first:
                move_target()
        fixed_views = flip_views(next(lower_batches))
        buffers = [b.clone() for m in (lower, target) if m is not None for b in m.buffers()]
        for _ in range(UPPER_ITERS):
            x, y = next(upper_batches)
            through_lower = F.cross_entropy(upper.head(lower.backbone(x)), y)
            head_lower = torch.autograd.grad(through_lower, head, retain_graph=True)
            v = torch.autograd.grad(through_lower, lower_params)
            ij = R.implicit_grad(lambda: pretext_loss(fixed_views), lower_params, v, LAM, DAMPING, CG_ITERS, True)
            direct = F.cross_entropy(upper.head(upper.backbone(x)), y)
            direct_backbone = torch.autograd.grad(direct, upper_backbone, retain_graph=True)
            direct_head = torch.autograd.grad(direct, head)
            for p, a, b in zip(upper_backbone, ij, direct_backbone):
                p.grad = a + b
            for p, a, b in zip(head, head_lower, direct_head):
                p.grad = a + b
            torch.nn.utils.clip_grad_norm_(list(upper.parameters()), 10.0)
            opt_upper.step()
            opt_upper.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip([b for m in (lower, target) if m is not None for b in m.buffers()], buffers):
                b.copy_(saved)
    return _parameters(lower, upper, target)


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_three_stages_equal_the_papers_procedure(batches, pretext, batchnorm):
    assert rel_err(_trainer_run(pretext, batchnorm, batches), _paper_loop(pretext, batchnorm, batches)) < 1e-10


@pytest.mark.parametrize("batchnorm", [False, True])
def test_moving_the_byol_target_after_the_step_changes_the_result(batches, batchnorm):
    """The order the library used before: the upper stage then sees a target one move ahead of the
    paper's, and three stages differ far beyond rounding (6.7e-5 without BatchNorm and 3.4e-3 with it
    here, measured)."""
    ours = _trainer_run("byol", batchnorm, batches)
    assert rel_err(ours, _paper_loop("byol", batchnorm, batches, target_moves_first=False)) > 1e-5
