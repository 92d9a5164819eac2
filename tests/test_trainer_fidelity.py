"""The trainer's paper-fidelity options: per-view forwards, BYOL EMA default, sampler epochs, per-tensor lam."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyLower as _Lower
from helpers import TinyUpper as _Upper
from helpers import flip_views as _views
from helpers import rel_err
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from bissl_fast import reference
from bissl_fast.data.tensors import TensorLoader, load_digits
from bissl_fast.train.config import BiSSLConfig
from bissl_fast.train.heads import Classifier
from bissl_fast.train.models import PretextModel, SmallResNet
from bissl_fast.train.trainer import BiSSLTrainer


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    yield


@pytest.fixture(scope="module")
def digits():
    return load_digits(size=None)


def _models(pretext: str, batchnorm: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if batchnorm:
        backbone = SmallResNet(1, widths=(4, 8), blocks=(1, 1))
        lower = PretextModel(backbone, 8, proj_dim=8, hidden_dim=16, predictor=pretext == "byol")
        upper = Classifier(copy.deepcopy(backbone), 8, 10)
    else:
        lower, upper = _Lower(pretext == "byol"), _Upper()
    with torch.no_grad():
        for p in upper.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lower.double(), upper.double()


def _trainer(digits, pretext, batchnorm=False, lower_loader=None, **cfg) -> BiSSLTrainer:
    lower, upper = _models(pretext, batchnorm)
    x, y = digits.x.double(), digits.y
    settings = dict(pretext=pretext, lower_iters=2, upper_iters=2, cg_iters=3, progress=False)
    settings.update(cfg)
    return BiSSLTrainer(
        lower, upper,
        lower_loader if lower_loader is not None else TensorLoader(x[:64], None, batch_size=16, seed=1),
        TensorLoader(x[100:164], y[100:164], batch_size=16, seed=2),
        torch.optim.SGD(lower.parameters(), lr=0.1, momentum=0.9),
        torch.optim.SGD(upper.parameters(), lr=0.1, momentum=0.9),
        BiSSLConfig(**settings),
        lower_transform=_views,
    )


def _state(trainer: BiSSLTrainer) -> list[torch.Tensor]:
    models = [trainer.lower_model, trainer.upper_model] + ([trainer.target_model] if trainer.target_model is not None else [])
    return [t.detach().clone() for m in models for t in m.state_dict().values() if t.is_floating_point()]


@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_concat_views_only_matters_with_batchnorm(digits, pretext):
    """Without BatchNorm the option leaves a stage unchanged (to rounding); with it the stage differs."""
    runs = {}
    for batchnorm in (False, True):
        for concat in (False, True):
            trainer = _trainer(digits, pretext, batchnorm, concat_views=concat)
            start = _state(trainer)
            trainer.fit(1)
            runs[batchnorm, concat] = _state(trainer)
            assert rel_err(runs[batchnorm, concat], start) > 1e-4  # the stage moved the models
    assert rel_err(runs[False, True], runs[False, False]) < 1e-12
    assert rel_err(runs[True, True], runs[True, False]) > 1e-4


@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_fused_batchnorm_changes_kernels_not_results(digits, pretext):
    """The fused BatchNorm option converts the lower model's layers and gives the same stage (float64)."""
    from bissl_fast.nn import BatchNorm2d

    runs = {}
    for fused in (False, True):
        trainer = _trainer(digits, pretext, batchnorm=True, fused_batchnorm=fused)
        kinds = {type(m) for m in trainer.lower_model.modules() if isinstance(m, nn.BatchNorm2d)}
        assert kinds == ({BatchNorm2d} if fused else {nn.BatchNorm2d})
        assert not any(isinstance(m, BatchNorm2d) for m in trainer.upper_model.modules())
        trainer.fit(1)
        runs[fused] = _state(trainer)
    assert rel_err(runs[True], runs[False]) < 1e-10


def test_fused_batchnorm_auto_is_on_for_cpu_models(digits):
    from bissl_fast.nn import BatchNorm2d

    trainer = _trainer(digits, "simclr", batchnorm=True)
    assert BiSSLConfig().fused_batchnorm == "auto"
    assert any(isinstance(m, BatchNorm2d) for m in trainer.lower_model.modules())
    with pytest.raises(ValueError, match="fused_batchnorm"):
        BiSSLConfig(fused_batchnorm="yes")


def test_defaults_are_the_papers():
    cfg = BiSSLConfig()
    assert (cfg.lower_iters, cfg.upper_iters, cfg.lam, cfg.damping, cfg.cg_iters) == (20, 8, 0.001, 10.0, 5)
    assert (cfg.clip_norm, cfg.temperature, cfg.byol_momentum, cfg.concat_views) == (10.0, 0.5, 0.9995, False)


def test_byol_target_follows_the_configured_momentum(digits):
    """The paper's order: each lower step first moves the target toward the online weights as they are."""
    trainer = _trainer(digits, "byol", lower_iters=1, upper_iters=0)
    assert trainer.ema.momentum == 0.9995
    target = [p.detach().clone() for p in trainer.target_backbone.parameters()]
    trainer.train_stage()  # the target starts as a copy of the online network: the first move keeps it
    assert rel_err([p.detach() for p in trainer.target_backbone.parameters()], target) < 1e-15
    online = [p.detach().clone() for p in trainer.lower_backbone.parameters()]
    trainer.train_stage()
    expected = [0.9995 * t + 0.0005 * o for t, o in zip(target, online)]
    assert rel_err([p.detach() for p in trainer.target_backbone.parameters()], expected) < 1e-12


def _sampler_loader(x: torch.Tensor) -> DataLoader:
    sampler = DistributedSampler(TensorDataset(x), num_replicas=1, rank=0, shuffle=True, seed=5)
    return DataLoader(TensorDataset(x), batch_size=16, sampler=sampler)


def test_distributed_sampler_gets_set_epoch_and_resumes(digits):
    """Every pass over a DataLoader calls set_epoch(pass), so passes differ; a resume mid-pass replays it."""
    x = digits.x[:64].double()
    seen = []
    trainer = _trainer(digits, "simclr", lower_loader=_sampler_loader(x), lower_iters=5, upper_iters=0)
    trainer.lower_transform = lambda batch: seen.append(batch[0]) or _views(batch[0])
    trainer.fit(1)  # 5 batches: pass 0 (4 batches) and the first of pass 1
    state = trainer.state_dict()
    trainer.fit(1)  # the rest of pass 1, the start of pass 2
    expected = []
    for epoch in range(3):
        sampler = DistributedSampler(TensorDataset(x), num_replicas=1, rank=0, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        expected += [x[order[i : i + 16]] for i in range(0, 64, 16)]
    assert len(seen) == 10
    for got, want in zip(seen, expected):
        assert torch.equal(got, want)
    assert not torch.equal(expected[0], expected[4])  # epochs 0 and 1 visit different orders

    resumed_seen = []
    resumed = _trainer(digits, "simclr", lower_loader=_sampler_loader(x), lower_iters=5, upper_iters=0)
    resumed.lower_transform = lambda batch: resumed_seen.append(batch[0]) or _views(batch[0])
    resumed.load_state_dict(state)
    resumed.fit(1)
    for got, want in zip(resumed_seen, seen[5:]):
        assert torch.equal(got, want)
    assert len(resumed_seen) == 5
    assert all(torch.equal(a, b) for a, b in zip(_state(resumed), _state(trainer)))


@pytest.mark.parametrize("solver", ["reuse", "recompute"])
def test_per_tensor_lam(digits, solver):
    """A per-tensor lam of equal values is the scalar run; unequal values change the stage; solvers agree."""
    scalar = _trainer(digits, "simclr", solver=solver, lam=0.3)
    count = len(scalar.lower_params)
    uniform = _trainer(digits, "simclr", solver=solver, lam=[0.3] * count)
    for t in (scalar, uniform):
        t.fit(1)
    assert rel_err(_state(uniform), _state(scalar)) < 1e-13
    lams = [0.05 * (i + 1) for i in range(count)]
    varied = _trainer(digits, "simclr", solver=solver, lam=lams)
    other = _trainer(digits, "simclr", solver="recompute" if solver == "reuse" else "reuse", lam=lams)
    for t in (varied, other):
        t.fit(1)
    assert rel_err(_state(varied), _state(scalar)) > 1e-6
    assert rel_err(_state(varied), _state(other)) < 1e-10


def test_per_tensor_lam_lower_step(digits):
    """Lower step with SGD(lr=1), no clipping: theta_P,t -= grad_t L_P + lam_t (theta_P,t - theta_D,t)."""
    x = digits.x.double()
    lams = [0.1, 0.7, 0.0, 1.3]
    trainer = _trainer(
        digits, "simclr", lower_iters=1, upper_iters=0, lam=lams, clip_norm=1e9,
        lower_loader=TensorLoader(x[:32], None, batch_size=16, shuffle=False),
    )
    for group in trainer.lower_optimizer.param_groups:
        group["lr"], group["momentum"] = 1.0, 0.0
    lower = copy.deepcopy(trainer.lower_model)
    theta_d = [p.detach() for p in trainer.upper_model.backbone.parameters()]
    z = torch.cat([lower.head(lower.backbone(v)) for v in _views(x[:16])])
    grads = torch.autograd.grad(reference.nt_xent(z, temperature=0.5), tuple(lower.parameters()))
    expected = [p.detach() - g for p, g in zip(lower.parameters(), grads)]
    for i, p in enumerate(lower.backbone.parameters()):  # the backbone comes first in lower.parameters()
        expected[i] = expected[i] - lams[i] * (p.detach() - theta_d[i])
    trainer.train_stage()
    assert rel_err([p.detach() for p in trainer.lower_model.parameters()], expected) < 1e-12


def test_per_tensor_lam_errors(digits):
    with pytest.raises(ValueError, match="one per backbone parameter tensor"):
        _trainer(digits, "simclr", lam=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"lam\[1\]"):
        BiSSLConfig(lam=[0.1, -0.2])
    with pytest.raises(ValueError, match="non-empty"):
        BiSSLConfig(lam=[])
    with pytest.raises(ValueError, match=r"lam\[0\] \+ damping"):
        BiSSLConfig(lam=[0.0], damping=0.0)
    with pytest.raises(TypeError, match="concat_views"):
        BiSSLConfig(concat_views="yes")


def test_solve_settings_and_errors():
    cfg = BiSSLConfig()
    assert (cfg.solve_method, cfg.layerwise, cfg.cg_layerwise, cfg.auto_damping) == ("cg", None, True, False)
    assert not BiSSLConfig(layerwise=False).cg_layerwise and not BiSSLConfig(solve_method="minres").cg_layerwise
    with pytest.raises(ValueError, match="solve_method must be one of"):
        BiSSLConfig(solve_method="gmres")
    with pytest.raises(ValueError, match="layerwise applies to CG only"):
        BiSSLConfig(solve_method="minres", layerwise=True)
    with pytest.raises(TypeError, match="measure_residual must be a bool or None"):
        BiSSLConfig(measure_residual=1)
    with pytest.raises(TypeError, match="auto_damping must be a bool"):
        BiSSLConfig(auto_damping="yes")
    with pytest.raises(ValueError, match="auto_damping needs solver='reuse'"):
        BiSSLConfig(auto_damping=True, solver="recompute")


@pytest.mark.parametrize("solve_method", ["cg", "minres"])
def test_auto_damping_and_minres_in_a_stage(digits, solve_method):
    """The stage log carries the raised damping and every product (solves, residual checks, Lanczos);
    reuse and the paper-style recompute agree for MINRES too."""
    trainer = _trainer(digits, "simclr", batchnorm=True, damping=0.5, auto_damping=True, solve_method=solve_method)
    log = trainer.fit(1)[0]
    assert log.damping > 0.5 and log.indefinite is False
    assert log.hessian_products == 10 + 2 * (3 + (solve_method == "cg"))
    runs = {}
    for solver in ("reuse", "recompute"):
        t = _trainer(digits, "simclr", batchnorm=True, solve_method=solve_method, solver=solver)
        t.fit(1)
        runs[solver] = _state(t)
    assert rel_err(runs["reuse"], runs["recompute"]) < 1e-10
