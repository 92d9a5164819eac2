"""The fused losses inside other people's training code: lightly's SimCLR / BYOL models trained a few steps
with lightly's losses and with ours (the real lightly package), lightly's NTXentLoss constructor, and a
``torch.compile``d training step whose only graph breaks are the caller's own."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from bissl_fast.ops.byol import BYOLLoss
from bissl_fast.ops.nt_xent import NTXentLoss
from helpers import assert_close_rel, import_or_skip, run_distributed

BISSL_FAST_DIR = os.path.dirname(os.path.abspath(__import__("bissl_fast").__file__))


@pytest.mark.parametrize("make", [
    lambda: NTXentLoss(0.5, 0),                                    # lightly's positional memory_bank_size
    lambda: NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False),
    lambda: NTXentLoss(0.5, (0, 128), False),                       # lightly's tuple spelling of "no bank"
    lambda: NTXentLoss(memory_bank_size=[0, 64]),
])
def test_ntxent_takes_lightlys_constructor(make):
    loss = make()
    assert loss.temperature == 0.5 and loss.views == 2 and not loss.gather_distributed
    z0, z1 = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(loss(z0, z1), NTXentLoss(backend="torch")(z0, z1))


@pytest.mark.parametrize("bank", [4096, (4096, 128), 1, True, (), "0", 0.0])
def test_ntxent_refuses_a_memory_bank_in_one_line(bank):
    with pytest.raises(ValueError, match=r"^memory_bank_size must be 0 \(no memory bank\), got .*: bissl_fast's "
                                         r"NTXentLoss has no MoCo-style memory bank"):
        NTXentLoss(0.5, bank)


def test_ntxent_own_options_are_keyword_only():
    with pytest.raises(TypeError):
        NTXentLoss(0.5, 0, False, 3)  # views is keyword-only: positions 2-3 are lightly's
    assert NTXentLoss(0.3, views=3).views == 3
    assert "gather_distributed=True" in repr(NTXentLoss(gather_distributed=True))


# ---------------------------------------------------------------------------------------------------
# lightly's models (as in lightly's examples), trained with lightly's loss and with ours.
# ---------------------------------------------------------------------------------------------------


def _lightly_simclr(torchvision, heads):
    class SimCLR(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = heads.SimCLRProjectionHead(512, 64, 32)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

    resnet = torchvision.models.resnet18(weights=None)
    return SimCLR(nn.Sequential(*list(resnet.children())[:-1]))


def _train(model, loss_of_batch, steps, dtype):
    torch.manual_seed(1)
    model = model.to(dtype)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x0, x1 = torch.randn(2, 6, 3, 32, 32, dtype=dtype)
        loss = loss_of_batch(model, x0, x1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach() for p in model.parameters()]


@pytest.mark.integration
def test_lightly_simclr_trains_alike_with_either_ntxent():
    """Three SGD steps of lightly's SimCLR example model in float64: replacing lightly's import by ours changes
    nothing; and one float32 step's loss and gradients agree to fp32 accuracy (over several steps fp32 rounding
    differences grow through the network, so the trajectory is compared in float64)."""
    lightly_loss = import_or_skip("lightly.loss")
    heads = import_or_skip("lightly.models.modules.heads")
    torchvision = import_or_skip("torchvision")
    torch.manual_seed(0)
    model = _lightly_simclr(torchvision, heads)
    criteria = {"lightly": lightly_loss.NTXentLoss(temperature=0.5, memory_bank_size=0),
                "bissl_fast": NTXentLoss(temperature=0.5, memory_bank_size=0)}
    runs = {name: _train(copy.deepcopy(model), lambda m, x0, x1, c=criterion: c(m(x0), m(x1)), 3, torch.float64)
            for name, criterion in criteria.items()}
    assert_close_rel("losses", runs["bissl_fast"][0], runs["lightly"][0], 1e-10)
    assert_close_rel("parameters after 3 steps", runs["bissl_fast"][1], runs["lightly"][1], 1e-10)
    x0, x1 = torch.randn(2, 6, 3, 32, 32)
    results = {}
    for name, criterion in criteria.items():
        copy_ = copy.deepcopy(model)
        loss = criterion(copy_(x0), copy_(x1))
        results[name] = (loss, *torch.autograd.grad(loss, tuple(copy_.parameters())))
    assert_close_rel("float32 loss", results["bissl_fast"][0], results["lightly"][0], 1e-5)
    assert_close_rel("float32 gradients", results["bissl_fast"][1:], results["lightly"][1:], 1e-5)


@pytest.mark.integration
def test_lightly_byol_trains_alike_with_byol_loss():
    """lightly's BYOL example model (momentum copies, ``update_momentum``): lightly has no BYOL loss module; its
    ``0.5 * (NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0))`` is ``(BYOLLoss()(p0, p1, z0, z1)
    - 4) / 4``, and training with ``BYOLLoss / 4`` follows the same trajectory."""
    import_or_skip("lightly")
    torchvision = import_or_skip("torchvision")
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    class BYOL(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(512, 64, 32)
            self.prediction_head = BYOLPredictionHead(32, 64, 32)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    model = BYOL(nn.Sequential(*list(resnet.children())[:-1]))
    ncs, ours = NegativeCosineSimilarity(), BYOLLoss()

    def step(lightly_loss: bool):
        def loss_of_batch(m, x0, x1):
            update_momentum(m.backbone, m.backbone_momentum, m=0.99)
            update_momentum(m.projection_head, m.projection_head_momentum, m=0.99)
            p0, p1, z0, z1 = m(x0), m(x1), m.forward_momentum(x0), m.forward_momentum(x1)
            if lightly_loss:
                return 0.5 * (ncs(p0, z1) + ncs(p1, z0))
            return (ours(p0, p1, z0, z1) - 4) / 4
        return loss_of_batch

    runs = {name: _train(copy.deepcopy(model), step(name == "lightly"), 3, torch.float64) for name in ("lightly", "ours")}
    assert_close_rel("losses", runs["ours"][0], runs["lightly"][0], 1e-10)
    assert_close_rel("parameters after 3 steps", runs["ours"][1], runs["lightly"][1], 1e-10)


def _gather_worker(rank: int, world_size: int) -> None:
    from lightly.loss import NTXentLoss as LightlyNTXentLoss

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    out0, out1 = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    results = []
    for criterion in (LightlyNTXentLoss(0.3, 0, True), NTXentLoss(0.3, 0, True)):
        z0, z1 = out0.clone().requires_grad_(), out1.clone().requires_grad_()
        loss = criterion(z0, z1)
        loss.backward()
        results.append((loss.detach(), z0.grad, z1.grad))
    (lightly_loss, *lightly_grads), (loss, *grads) = results
    mean = lightly_loss.clone()
    torch.distributed.all_reduce(mean)
    assert_close_rel("loss = mean over ranks of lightly's", loss, mean / world_size, 1e-12)
    assert_close_rel("gradients on this rank", grads, lightly_grads, 1e-12)


@pytest.mark.integration
@pytest.mark.distributed
def test_gather_distributed_against_lightly():
    """2 gloo ranks, ``gather_distributed=True``: each rank's gradients equal lightly's; the value is the global
    batch's loss, the mean over ranks of lightly's per-rank values."""
    import_or_skip("lightly")
    run_distributed(_gather_worker)


# ---------------------------------------------------------------------------------------------------
# torch.compile of a training step: no graph break inside bissl_fast.
# ---------------------------------------------------------------------------------------------------


def _training_step(model, ntxent, byol, with_hvp: bool = True):
    """A SimCLR + BYOL step as users write it: forward, ``backward()`` and, ``with_hvp``, a Hessian-vector
    product (the create_graph gradient differentiated again, as BiSSL's implicit gradient does)."""
    def step(x0, x1, v):
        z0, z1 = model(x0), model(x1)
        loss = ntxent(z0, z1) + byol(z0, z1, z1.detach(), z0.detach())
        if with_hvp:
            params = tuple(model.parameters())
            grads = torch.autograd.grad(loss, params, create_graph=True)
            torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v)), params, retain_graph=True)
        loss.backward()
        return loss.detach()
    return step


def _bissl_fast_frames(reason) -> list[str]:
    return [f"{frame.filename}:{frame.lineno} {frame.name}" for frame in reason.user_stack
            if os.path.abspath(frame.filename).startswith(BISSL_FAST_DIR)]


@pytest.mark.parametrize("batch", [6, 1030])  # one logits block, and row blocks (N = 2060 > 2048)
def test_compiled_training_step_breaks_nowhere_in_bissl_fast(batch, one_intra_op_thread):
    """``torch._dynamo.explain`` of a step using NTXentLoss and BYOLLoss: the user's ``backward()`` /
    ``autograd.grad`` calls break the graph (dynamo does not trace them), and the kernels they run
    eagerly are then compiled frame by frame; none of those frames may break."""
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x0, x1 = torch.randn(2, batch, 5, dtype=torch.float64)
    v = tuple(torch.randn_like(p) for p in model.parameters())
    step = _training_step(model, NTXentLoss(0.5), BYOLLoss())
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x0, x1, v)
    ours = {reason.reason.splitlines()[0]: _bissl_fast_frames(reason) for reason in explanation.break_reasons}
    assert not {reason: frames for reason, frames in ours.items() if frames}, ours
    # The compiled step computes what the eager one does: dynamo's graphs run as captured (with the kernels
    # traced frame by frame in between) and through AOTAutograd. Without the HVP: a Hessian-vector product
    # through a compiled step is not supported by the fused losses' autograd Functions (dynamo captures their
    # backward once-differentiable), so only the break check above runs one.
    for backend in ("eager", "aot_eager"):
        step = _training_step(model, NTXentLoss(0.5), BYOLLoss(), with_hvp=False)
        model.zero_grad()
        eager_loss = step(x0, x1, v)
        eager_grad = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch._dynamo.reset()
        loss = torch.compile(step, backend=backend)(x0, x1, v)
        torch._dynamo.reset()
        assert_close_rel(f"{backend}: loss", loss, eager_loss, 1e-12)
        assert_close_rel(f"{backend}: gradient", [p.grad for p in model.parameters()], eager_grad, 1e-12)
