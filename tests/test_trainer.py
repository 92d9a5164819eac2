"""BiSSLTrainer: update formulas, graph reuse == paper recompute, resume == uninterrupted, BYOL target, errors."""
from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

from bissl_fast import reference
from bissl_fast.data.tensors import BatchAugment, TensorLoader, load_digits
from bissl_fast.train.config import BiSSLConfig
from bissl_fast.train.heads import Classifier
from bissl_fast.train.models import PretextModel, SmallResNet
from bissl_fast.train.stage import StageLog
from bissl_fast.train.trainer import BiSSLTrainer


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: extra threads only add contention on the shared CI cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_digits(size=None)


def _models(pretext: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[PretextModel, Classifier]:
    torch.manual_seed(seed)
    backbone = SmallResNet(1, widths=(4, 8), blocks=(1, 1))
    lower = PretextModel(backbone, backbone.out_dim, proj_dim=8, hidden_dim=16, predictor=pretext == "byol")
    upper = Classifier(copy.deepcopy(backbone), backbone.out_dim, 10)
    # The upper backbone starts elsewhere than the lower one, so the proximal term is non-zero.
    with torch.no_grad():
        for p in upper.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lower.to(dtype), upper.to(dtype)


def _trainer(
    digits, pretext, solver="reuse", *, seed=0, lower_loader=None, upper_loader=None, lower_transform=None,
    sgd=False, schedulers=False, dtype=torch.float32, **cfg,
):
    lower, upper = _models(pretext, dtype, seed)
    x, y = digits.x.to(dtype), digits.y
    lower_loader = lower_loader if lower_loader is not None else TensorLoader(x[:64], None, batch_size=16, seed=1)
    upper_loader = upper_loader if upper_loader is not None else TensorLoader(x[100:164], y[100:164], batch_size=16, seed=2)
    if sgd:
        opt_l = torch.optim.SGD(lower.parameters(), lr=1.0)
        opt_u = torch.optim.SGD(upper.parameters(), lr=1.0)
    else:
        opt_l = torch.optim.SGD(lower.parameters(), lr=0.05, momentum=0.9)
        opt_u = torch.optim.AdamW(upper.parameters(), lr=1e-3)
    kwargs = {}
    if schedulers:
        kwargs = {
            "lower_scheduler": torch.optim.lr_scheduler.StepLR(opt_l, step_size=2, gamma=0.5),
            "upper_scheduler": torch.optim.lr_scheduler.StepLR(opt_u, step_size=1, gamma=0.9),
        }
    if lower_transform is None:
        aug = BatchAugment()

        def lower_transform(batch):  # DataLoader batches are 1-tuples, TensorLoader ones plain tensors
            return aug.views(batch[0] if isinstance(batch, (list, tuple)) else batch, 2)

    defaults = dict(pretext=pretext, lower_iters=2, upper_iters=2, cg_iters=3, solver=solver, progress=False)
    defaults.update(cfg)
    return BiSSLTrainer(
        lower, upper, lower_loader, upper_loader, opt_l, opt_u, BiSSLConfig(**defaults),
        lower_transform=lower_transform, **kwargs,
    )


def _params(trainer: BiSSLTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in list(trainer.lower_model.parameters()) + list(trainer.upper_model.parameters())]


@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_graph_reuse_equals_paper_recompute(digits, pretext):
    runs = {}
    for solver in ("reuse", "recompute"):
        trainer = _trainer(digits, pretext, solver)
        log = trainer.fit(1)
        runs[solver] = _params(trainer)
    assert len(log[0]["upper_losses"]) == 2
    assert rel_err(runs["reuse"], runs["recompute"]) < 1e-5
    # The stage moved the parameters (the comparison above is not between two untouched models).
    assert rel_err(runs["reuse"], _params(_trainer(digits, pretext))) > 1e-4


def _detached(params):
    return [p.detach() for p in params]


def _deterministic_views(batch):
    return [batch, batch.flip(-1) * 0.9]


@pytest.mark.parametrize("solve_method", ["cg", "minres"])
def test_upper_step_formula(digits, solve_method):
    """One upper step with SGD(lr=1), no clipping: theta_D -= IJ(v) + g_D, head -= both head grads (fp64)."""
    x, y = digits.x.double(), digits.y
    trainer = _trainer(
        digits, "simclr", "reuse", sgd=True, dtype=torch.float64, lower_iters=0, upper_iters=1, clip_norm=1e9,
        solve_method=solve_method,
        lower_loader=TensorLoader(x[:32], None, batch_size=16, shuffle=False),
        lower_transform=_deterministic_views, upper_loader=TensorLoader(x[100:116], y[100:116], batch_size=16, shuffle=False),
    )
    lower, upper = copy.deepcopy(trainer.lower_model), copy.deepcopy(trainer.upper_model)
    lower_state = copy.deepcopy(trainer.lower_model.state_dict())
    views = _deterministic_views(x[:16])
    xu, yu = x[100:116], y[100:116]

    def pretext_loss():
        z = torch.cat([lower.head(lower.backbone(v)) for v in views])  # one forward per view
        return reference.nt_xent(z, temperature=0.5)

    p_params = tuple(lower.backbone.parameters())
    head = tuple(upper.head.parameters())
    g1 = torch.autograd.grad(F.cross_entropy(upper.head(lower.backbone(xu)), yu), p_params + head)
    g2 = torch.autograd.grad(F.cross_entropy(upper.head(upper.backbone(xu)), yu), tuple(upper.backbone.parameters()) + head)
    ij = reference.implicit_grad(pretext_loss, p_params, g1[: len(p_params)], 0.001, 10.0, 3, True, solve_method)
    expected_backbone = [p.detach() - a - b for p, a, b in zip(upper.backbone.parameters(), ij, g2)]
    expected_head = [p.detach() - a - b for p, a, b in zip(head, g1[len(p_params):], g2[len(p_params):])]

    log = trainer.train_stage()
    assert rel_err(_detached(trainer.upper_model.backbone.parameters()), expected_backbone) < 1e-10
    assert rel_err(_detached(trainer.upper_model.head.parameters()), expected_head) < 1e-10
    # The upper stage leaves the lower model untouched, BatchNorm running statistics included.
    for key, value in trainer.lower_model.state_dict().items():
        assert torch.equal(value, lower_state[key]), key
    # Solve quality: one solve, its residual and that of no solve; layerwise CG measures its residual with one more product.
    assert log["solve_method"] == {"cg": "cg-layerwise", "minres": "minres"}[solve_method]
    assert len(log["solve_residuals"]) == len(log["no_solve_residuals"]) == 1
    assert 0 < log["solve_residuals"][0] < float("inf") and 0 < log["no_solve_residuals"][0] < float("inf")
    assert log["solves_worse"] == int(log["solve_residuals"][0] > log["no_solve_residuals"][0])
    assert log["hessian_products"] == 3 + (solve_method == "cg") and log["damping"] == 10.0
    assert isinstance(log["indefinite"], bool) and log["indefinite"] == (log["system_min_estimate"] < 0)


@pytest.mark.parametrize("concat_views", [False, True])
def test_lower_step_formula_and_clipping(digits, concat_views):
    """One lower step with SGD(lr=1): theta_P -= grad L_P + lam (theta_P - theta_D); clipping caps the step norm.

    ``L_P`` runs one forward per view, or one on the concatenated views with ``concat_views``.
    """
    x = digits.x.double()
    loader = TensorLoader(x[:32], None, batch_size=16, shuffle=False)
    trainer = _trainer(
        digits, "simclr", sgd=True, dtype=torch.float64, lower_iters=1, upper_iters=0, lam=0.5, clip_norm=1e9,
        lower_loader=loader, lower_transform=_deterministic_views, concat_views=concat_views,
    )
    lower = copy.deepcopy(trainer.lower_model)
    theta_d = [p.detach() for p in trainer.upper_model.backbone.parameters()]
    views = _deterministic_views(x[:16])
    if concat_views:
        z = lower.head(lower.backbone(torch.cat(views)))
    else:
        z = torch.cat([lower.head(lower.backbone(v)) for v in views])
    grads = torch.autograd.grad(reference.nt_xent(z, temperature=0.5), tuple(lower.parameters()))
    expected = [p.detach() - g for p, g in zip(lower.parameters(), grads)]
    for i, p in enumerate(lower.backbone.parameters()):  # the backbone comes first in lower.parameters()
        expected[i] = expected[i] - 0.5 * (p.detach() - theta_d[i])
    trainer.train_stage()
    assert rel_err(_detached(trainer.lower_model.parameters()), expected) < 1e-10

    clipped = _trainer(
        digits, "simclr", sgd=True, dtype=torch.float64, lower_iters=1, upper_iters=0, clip_norm=1e-3,
        lower_loader=TensorLoader(x[:32], None, batch_size=16, shuffle=False), lower_transform=_deterministic_views,
    )
    before = [p.detach().clone() for p in clipped.lower_model.parameters()]
    clipped.train_stage()
    step = torch.sqrt(sum(((a.detach() - b) ** 2).sum() for a, b in zip(clipped.lower_model.parameters(), before)))
    assert float(step) == pytest.approx(1e-3, rel=1e-6)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_resume_equals_uninterrupted(digits, pretext):
    """Kill after stage 1 (mid-epoch of a shuffling DataLoader), resume in a fresh trainer: bit-identical."""
    x = digits.x[:64]

    def loader():
        gen = torch.Generator().manual_seed(3)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16, shuffle=True, generator=gen)

    full = _trainer(digits, pretext, lower_loader=loader(), schedulers=True)
    full.fit(3)

    first = _trainer(digits, pretext, lower_loader=loader(), schedulers=True)
    first.fit(1)
    state = _roundtrip(first.state_dict())
    torch.manual_seed(1234)  # the resumed process starts with other RNG states and other weights
    resumed = _trainer(digits, pretext, lower_loader=loader(), schedulers=True, seed=7)
    resumed.load_state_dict(state)
    resumed.fit(2)

    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)
    for a, b in zip(full.lower_model.state_dict().values(), resumed.lower_model.state_dict().values()):
        assert torch.equal(a, b)
    if pretext == "byol":
        for a, b in zip(full.target_model.state_dict().values(), resumed.target_model.state_dict().values()):
            assert torch.equal(a, b)
    assert [e["lower_losses"] for e in full.log] == [e["lower_losses"] for e in resumed.log]
    assert (full.stage, full.lower_step, full.upper_step) == (resumed.stage, resumed.lower_step, resumed.upper_step) == (3, 6, 6)


@pytest.mark.parametrize("solver", ["reuse", "recompute"])
def test_byol_target_only_updated_after_lower_steps(digits, solver):
    trainer = _trainer(digits, "byol", solver, lower_iters=0, upper_iters=2)
    calls = []
    trainer.target_backbone.register_forward_hook(lambda *_: calls.append(1))
    target_before = copy.deepcopy(trainer.target_model.state_dict())
    lower_before = copy.deepcopy(trainer.lower_model.state_dict())
    upper_before = _params(trainer)
    trainer.train_stage()
    # Upper stage only: the target runs for the fixed lower batch (one forward per view), nothing
    # inside the products.
    assert len(calls) == 2
    for key, value in trainer.target_model.state_dict().items():
        assert torch.equal(value, target_before[key]), key
    for key, value in trainer.lower_model.state_dict().items():
        assert torch.equal(value, lower_before[key]), key
    assert rel_err(_params(trainer), upper_before) > 0

    trainer.config.lower_iters, trainer.config.upper_iters = 1, 0
    online = [p.detach().clone() for p in list(trainer.lower_backbone.parameters())]
    target = [p.detach().clone() for p in trainer.target_backbone.parameters()]
    trainer.train_stage()
    m = trainer.config.byol_momentum
    # The target moves at the start of the lower step, toward the online weights before that step.
    expected = [m * t + (1 - m) * o for t, o in zip(target, online)]
    assert rel_err(_detached(trainer.target_backbone.parameters()), expected) < 1e-6
    assert rel_err(_detached(trainer.lower_backbone.parameters()), online) > 0


class _NoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)


def test_errors(digits):
    lower, upper = _models("simclr")
    opt_l = torch.optim.SGD(lower.parameters(), lr=0.1)
    opt_u = torch.optim.SGD(upper.parameters(), lr=0.1)
    loader = TensorLoader(digits.x[:32], digits.y[:32], batch_size=16)
    with pytest.raises(TypeError, match=r"lower_model must have an nn.Module attribute \.head"):
        BiSSLTrainer(_NoHead(), upper, loader, loader, opt_l, opt_u)
    with pytest.raises(TypeError, match=r"upper_model must have an nn.Module attribute \.backbone"):
        BiSSLTrainer(lower, nn.Linear(2, 2), loader, loader, opt_l, opt_u)
    with pytest.raises(TypeError, match=r"\.predictor"):
        BiSSLTrainer(lower, upper, loader, loader, opt_l, opt_u, BiSSLConfig(pretext="byol"))
    wide = Classifier(SmallResNet(1, widths=(4, 12), blocks=(1, 1)), 12, 10)
    with pytest.raises(ValueError, match="backbone parameter .* identical architectures"):
        BiSSLTrainer(lower, wide, loader, loader, opt_l, opt_u)
    deeper = Classifier(SmallResNet(1, widths=(4, 8), blocks=(1, 2)), 8, 10)
    with pytest.raises(ValueError, match="same parameters"):
        BiSSLTrainer(lower, deeper, loader, loader, opt_l, opt_u)
    with pytest.raises(TypeError, match="lower_optimizer"):
        BiSSLTrainer(lower, upper, loader, loader, "sgd", opt_u)
    with pytest.raises(TypeError, match="lower_loader"):
        BiSSLTrainer(lower, upper, 3, loader, opt_l, opt_u)
    for bad, match in [
        (dict(pretext="moco"), "pretext"), (dict(solver="fast"), "solver"), (dict(temperature=0.0), "temperature"),
        (dict(cg_iters=0), "cg_iters"), (dict(clip_norm=-1.0), "clip_norm"), (dict(byol_momentum=1.5), "byol_momentum"),
        (dict(lam=0.0, damping=0.0), "lam \\+ damping"),
    ]:
        with pytest.raises(ValueError, match=match):
            BiSSLConfig(**bad)
    # A lower batch that is neither views nor made into views by lower_transform.
    trainer = BiSSLTrainer(lower, upper, loader, loader, opt_l, opt_u, BiSSLConfig(progress=False))
    with pytest.raises(TypeError, match="view tensors"):
        trainer.train_stage()
    state = trainer.state_dict()
    byol_lower, byol_upper = _models("byol")
    byol = BiSSLTrainer(byol_lower, byol_upper, loader, loader, torch.optim.SGD(byol_lower.parameters(), lr=0.1),
                        torch.optim.SGD(byol_upper.parameters(), lr=0.1), BiSSLConfig(pretext="byol"))
    with pytest.raises(ValueError, match="pretext"):
        byol.load_state_dict(state)


def test_progress_without_tqdm(digits, monkeypatch, capsys):
    """Core install: an explicit progress=True prints plain lines and one note; progress=None stays silent."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    _trainer(digits, "simclr", progress=True).fit(1)
    err = capsys.readouterr().err
    assert err.count("tqdm is not installed") == 1 and "bissl_fast[demo]" in err
    assert "BiSSL: 4/4" in err
    _trainer(digits, "simclr", progress=None).fit(1)
    assert capsys.readouterr().err == ""
    assert BiSSLConfig().progress is None  # the default never asks for a bar explicitly


def test_stage_log_and_weights_only_checkpoint(digits):
    x = digits.x[:64]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    trainer = _trainer(digits, "byol", lower_loader=loader)
    entry = trainer.fit(1)[0]
    assert isinstance(entry, StageLog) and entry["upper_losses"] == entry.upper_losses and len(entry.upper_losses) == 2
    assert dict(entry.items()) == entry.as_dict()
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = _trainer(digits, "byol", lower_loader=loader)
    resumed.load_state_dict(state)
    assert resumed.log == trainer.log and resumed.stage == 1
