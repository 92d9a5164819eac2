"""Settings of the BiSSL stage (docs/design.md §2.4): :class:`BiSSLConfig`, the paper's values as defaults."""
from __future__ import annotations

from dataclasses import dataclass

from .._validation import check_int_at_least, check_nonnegative, check_positive

_PRETEXTS = ("simclr", "byol")
_SOLVERS = ("reuse", "recompute")
_SOLVE_METHODS = ("cg", "minres")


@dataclass
class BiSSLConfig:
    """Hyper-parameters of the BiSSL stage (docs/design.md §2.4).

    The paper's values (its own scripts) are the defaults of every field that has a counterpart
    there: ``lower_iters=20``, ``upper_iters=8``, ``lam=0.001``, ``damping=10``, ``cg_iters=5``,
    ``solve_method="cg"`` with layerwise scalars, ``clip_norm=10``, ``temperature=0.5``,
    ``byol_momentum=0.9995`` and one backbone forward per view (``concat_views=False``). The other
    fields are this library's. ``solve_method="minres"``, ``layerwise=False`` and
    ``auto_damping`` change the implicit gradient (docs/design.md §2.3 says how accurate each solve
    is); the rest change speed or reporting, not the result: ``solver="reuse"`` equals the paper's
    ``"recompute"`` to floating-point rounding (built once per upper stage instead of per
    product), ``backend`` picks the fused-loss kernels (all agree with the reference),
    ``measure_residual`` spends a product on the logged residual, and ``progress`` only prints;
    ``fused_batchnorm`` swaps the lower model's BatchNorm kernels for ones that agree with
    PyTorch's to rounding.

    pretext: ``"simclr"`` (NT-Xent over ``m`` views) or ``"byol"`` (2 views, EMA target network).
    lower_iters / upper_iters: steps of each level per stage.
    lam: weight of the proximal term ``sum_t (lam_t/2)||theta_P,t - theta_D,t||^2`` and of the IJ
        system; a scalar, or one value per backbone parameter tensor (in ``parameters()`` order).
    damping: added to ``lam`` in ``(I + H/(lam + damping)) x = v``.
    cg_iters: iterations (Hessian products) of each implicit-gradient solve, CG or MINRES.
    solve_method: ``"cg"`` (the paper's) or ``"minres"`` (its residual never exceeds that of no
        solve, also when the system is indefinite).
    layerwise: CG's per-tensor (layerwise, the paper's; ``None`` means this for CG) or global
        scalars; MINRES has only global ones (``True`` raises).
    measure_residual: one more Hessian product per solve measures ``||v - A x|| / ||v||`` for the
        stage log; ``None`` (default) does so only for layerwise CG, whose own recursion is not
        that residual (the others report theirs for free).
    auto_damping: raise ``damping`` per upper stage until the system is positive definite with
        margin (:class:`bissl_fast.solver.ImplicitGradient`; a few Lanczos products per stage).
    clip_norm: max total gradient norm of each level's step.
    temperature: NT-Xent temperature. byol_momentum: EMA rate of the BYOL target network.
    concat_views: run all views through the lower model (and BYOL's target) as one concatenated
        batch instead of one forward per view. Same loss without BatchNorm; with BatchNorm the
        batch statistics then mix the views, which the paper does not do.
    solver: ``"reuse"`` (Hessian operator built once per upper stage) or ``"recompute"`` (paper).
    backend: backend of the fused losses (``"auto" | "torch" | "cpp" | "triton" | "cuda"``).
    fused_batchnorm: run the lower model's ``nn.BatchNorm1d/2d`` layers with the fused forward,
        backward and double backward (:func:`bissl_fast.convert_batchnorm`, converted in place when
        the trainer is built). ``"auto"`` (default) converts on CPU, where the fused double backward
        makes each Hessian-vector product through a small ResNet ~1.3x faster (README, BatchNorm
        section), and not on CUDA, where the fused kernels have not been measured yet.
    progress: progress report on rank 0: ``None`` (default) a tqdm bar when tqdm is installed and
        nothing otherwise, ``True`` a tqdm bar (plain lines and a one-line note naming the ``demo``
        extra when tqdm is not installed), ``False`` none.
    """

    pretext: str = "simclr"
    lower_iters: int = 20
    upper_iters: int = 8
    lam: float | tuple[float, ...] = 0.001
    damping: float = 10.0
    cg_iters: int = 5
    solve_method: str = "cg"
    layerwise: bool | None = None
    measure_residual: bool | None = None
    auto_damping: bool = False
    clip_norm: float = 10.0
    temperature: float = 0.5
    byol_momentum: float = 0.9995
    concat_views: bool = False
    solver: str = "reuse"
    backend: str = "auto"
    fused_batchnorm: bool | str = "auto"
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.pretext not in _PRETEXTS:
            raise ValueError(f"pretext must be one of {_PRETEXTS}, got {self.pretext!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        if self.solve_method not in _SOLVE_METHODS:
            raise ValueError(f"solve_method must be one of {_SOLVE_METHODS}, got {self.solve_method!r}")
        for name in ("layerwise", "measure_residual"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool or None, got {type(getattr(self, name)).__name__}")
        if self.solve_method == "minres" and self.layerwise:
            raise ValueError("layerwise applies to CG only: MINRES has one set of scalars for the whole vector")
        if not isinstance(self.auto_damping, bool):
            raise TypeError(f"auto_damping must be a bool, got {type(self.auto_damping).__name__}")
        if self.auto_damping and self.solver == "recompute":
            raise ValueError("auto_damping needs solver='reuse' (it estimates the spectrum on the stage's Hessian operator)")
        check_int_at_least("lower_iters", self.lower_iters, 0)
        check_int_at_least("upper_iters", self.upper_iters, 0)
        check_int_at_least("cg_iters", self.cg_iters, 1)
        damping = check_nonnegative("damping", self.damping)
        if isinstance(self.lam, (tuple, list)):
            if not self.lam:
                raise ValueError("lam must be a number or a non-empty sequence of numbers, got an empty sequence")
            self.lam = tuple(check_nonnegative(f"lam[{i}]", value) for i, value in enumerate(self.lam))
            for i, value in enumerate(self.lam):
                check_positive(f"lam[{i}] + damping", value + damping)
        else:
            check_positive("lam + damping", check_nonnegative("lam", self.lam) + damping)
        if self.fused_batchnorm not in (True, False, "auto"):
            raise ValueError(f"fused_batchnorm must be True, False or 'auto', got {self.fused_batchnorm!r}")
        if not isinstance(self.concat_views, bool):
            raise TypeError(f"concat_views must be a bool, got {type(self.concat_views).__name__}")
        check_positive("clip_norm", self.clip_norm)
        check_positive("temperature", self.temperature)
        m = check_nonnegative("byol_momentum", self.byol_momentum)
        if m > 1:
            raise ValueError(f"byol_momentum must be in [0, 1], got {m}")

    @property
    def cg_layerwise(self) -> bool:
        """Whether CG runs layerwise (``layerwise=None`` means the paper's layerwise CG); ``False`` for MINRES."""
        return self.solve_method == "cg" and self.layerwise is not False


__all__ = ["BiSSLConfig"]
