"""Hessian-vector products of a pretext loss on a fixed batch (docs/design.md §2.3).

Within one BiSSL upper stage the lower parameters and the lower batch do not change, so the
Hessian ``H`` of the pretext loss is one fixed linear operator. :class:`HessianOperator` exposes
it as ``matvec`` (one vector) and ``matmat`` (``k`` vectors at once), with three ways to compute
a product:

``mode="rev-rev"`` (reverse-over-reverse, graph reuse)
    The loss and its first-order gradient graph (``create_graph=True``) are built ONCE when the
    operator is created; every product is one double backward through that retained graph.
    Memory: the graph stays alive (activations + gradient graph) until :meth:`release`.
``recompute=True`` (the paper's behaviour, ``rev-rev`` only)
    Every product re-runs the forward pass and the create_graph gradient, then the double
    backward; equals :func:`bissl_fast.reference.hvp`. Kept as the baseline.
``mode="fwd-rev"`` (forward-over-reverse)
    Every product is ``torch.func.jvp`` of ``torch.func.grad`` of the loss, computed through
    ``torch.func.functional_call(module, ...)``: no graph is held between products, each product
    runs one forward + backward with forward-mode tangents. Needs the ``module`` that owns the
    parameters.

``mode="auto"`` picks ``"rev-rev"`` on every device. On CPU it is the measured winner
(``benchmarks/bench_solver.py``, SmallResNet upper stage of 8 solves x 5 CG iterations, one
thread; committed results in ``benchmarks/results/``: rev-rev 1.65-1.74x faster than the paper's
recompute, fwd-rev 0.58-0.74x, i.e. slower than recompute, with about 1.8x the peak memory of
rev-rev). On CUDA no measurement
has been made yet; ``rev-rev`` is chosen there too because it needs no ``module`` and does the
least work per product (one double backward, no forward). Revisit once GPU numbers exist.

BatchNorm in train mode: the loss uses batch statistics, so the function of the parameters is
fixed for a fixed batch and the Hessian is well defined. With ``rev-rev`` the running statistics
are updated once, when the operator is built (the one forward pass), not once per product; with
``recompute=True`` they are updated on every product (as in the paper); ``fwd-rev`` never updates
the running statistics of BatchNorm layers inside ``module`` (they are switched to
``track_running_stats=False`` for the duration of each product and restored afterwards).

Distributed: when a process group with more than one rank is initialized (or
``average_over_ranks=True``), every product is averaged over ranks with one bucketed all-reduce.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._types import Tensors
from .._validation import check_tensor_tuple
from .._dist import bucketed_mean, is_distributed

if TYPE_CHECKING:  # typing.Self is Python >= 3.11; the package supports 3.10
    from typing_extensions import Self


MODES = ("auto", "rev-rev", "fwd-rev")


class _LossModule(nn.Module):
    """Wraps ``module`` so that ``functional_call`` swaps its parameters while ``loss_fn()`` runs."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        # Not a submodule even if loss_fn is an nn.Module: only ``module``'s parameters are swapped.
        object.__setattr__(self, "_loss_fn", loss_fn)

    def forward(self) -> torch.Tensor:
        return self._loss_fn()


@contextlib.contextmanager
def _batch_stats_without_tracking(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm layers use batch statistics but leave running stats untouched."""
    switched = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


class HessianOperator:
    """The Hessian of ``loss_fn()`` w.r.t. ``params`` as a reusable linear operator.

    Args:
        loss_fn: zero-argument callable returning the scalar loss on the fixed batch.
        params: tuple/list of parameter tensors ``theta_i`` (each ``requires_grad``).
        mode: ``"auto"`` | ``"rev-rev"`` | ``"fwd-rev"`` (see the module docstring).
        recompute: ``rev-rev`` only: rebuild the forward + gradient graph for every product
            (the paper's behaviour; the baseline).
        module: the ``nn.Module`` whose parameters include every tensor of ``params``;
            required for ``"fwd-rev"``. It must contain every network ``loss_fn`` runs that has
            train-mode BatchNorm layers (for BYOL also the target network, e.g.
            ``nn.ModuleList([online, target])``): their running-stat updates are switched off
            during the products, and any other in-place update is not allowed inside ``jvp``.
        average_over_ranks: average every product over torch.distributed ranks (one bucketed
            all-reduce per product). ``None``: whenever a multi-rank group is initialized.

    ``matvec(v)`` takes a tuple shaped like ``params`` and returns ``H v`` (detached tensors
    shaped like ``params``); ``matmat(V)`` takes ``V[i]`` of shape ``[k, *params[i].shape]`` and
    returns the ``k`` products stacked the same way. Parameters that do not reach the loss get
    zero products. Use as a context manager, or call :meth:`release` when done: it frees the
    retained graph, and any later product raises ``RuntimeError``.
    """

    def __init__(
        self,
        loss_fn: Callable[[], torch.Tensor],
        params: Sequence[torch.Tensor],
        mode: str = "auto",
        recompute: bool = False,
        module: nn.Module | None = None,
        average_over_ranks: bool | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a zero-argument callable, got {type(loss_fn).__name__}")
        self._params = check_tensor_tuple("params", params)
        for i, p in enumerate(self._params):
            if not p.requires_grad:
                raise ValueError(f"params[{i}] does not require grad; the Hessian w.r.t. it is undefined")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if average_over_ranks is not None and not isinstance(average_over_ranks, bool):
            raise TypeError(f"average_over_ranks must be a bool or None, got {type(average_over_ranks).__name__}")
        self.mode = "rev-rev" if mode == "auto" else mode
        if self.mode == "fwd-rev" and recompute:
            raise ValueError("recompute=True is the rev-rev baseline; fwd-rev recomputes every product by construction")
        if self.mode == "fwd-rev" and module is None:
            raise ValueError("mode='fwd-rev' needs module=<the nn.Module owning params> (for torch.func.functional_call)")
        self.recompute = recompute
        self._loss_fn = loss_fn
        self._average = average_over_ranks
        self._released = False
        self.num_products = 0
        self._grads: list[torch.Tensor] = []
        self._grad_index: list[int] = []
        if self.mode == "fwd-rev":
            self._wrapper = _LossModule(module, loss_fn)  # type: ignore[arg-type]
            self._names = self._names_in(module)  # type: ignore[arg-type]
        elif not recompute:
            self._grads, self._grad_index = self._build_graph()

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        loss_fn: Callable[[], torch.Tensor],
        params: Sequence[torch.Tensor] | None = None,
        mode: str = "fwd-rev",
        average_over_ranks: bool | None = None,
    ) -> HessianOperator:
        """Operator for ``loss_fn()`` (which calls ``module``) w.r.t. ``params`` (default: all trainable
        parameters of ``module``), forward-over-reverse by default."""
        if params is None:
            params = tuple(p for p in module.parameters() if p.requires_grad)
        return cls(loss_fn, params, mode=mode, module=module, average_over_ranks=average_over_ranks)

    # ------------------------------------------------------------------ properties / lifetime
    @property
    def params(self) -> Tensors:
        return self._params

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Free the retained graph; the operator cannot be used afterwards."""
        self._grads = []
        self._grad_index = []
        self._released = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ products
    def matvec(self, v: Sequence[torch.Tensor]) -> Tensors:
        """``H v``: ``v`` one tensor per parameter (``v[i].shape == params[i].shape``)."""
        self._check_alive()
        v = check_tensor_tuple("v", v, like=self._params)
        self._check_vectors(v)
        out = self._fwd_rev(v) if self.mode == "fwd-rev" else self._rev_rev(v, batched=False)
        self.num_products += 1
        return self._average_products(out)

    def matmat(self, vs: Sequence[torch.Tensor], chunk_size: int | None = None) -> Tensors:
        """``k`` products at once: ``vs[i]`` is ``[k, *params[i].shape]``; returns the same layout.

        ``rev-rev`` runs one double backward vmapped over the cotangents (``torch.func.vmap`` of
        ``torch.autograd.grad``); ``fwd-rev`` vmaps the jvp over the tangents. The fused ops' batching
        rules share their per-vector-independent work across the ``k`` vectors; what that buys is
        measured in ``benchmarks/bench_matmat.py`` (README, "Batched products").

        ``chunk_size``: at most this many vectors per batched pass (``torch.func.vmap``'s ``chunk_size``):
        the batched intermediates, ``k`` times a single product's, then stay within ``chunk_size`` times;
        ``None`` (default) takes all ``k`` at once. The results do not depend on it beyond rounding.
        """
        self._check_alive()
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if isinstance(vs, torch.Tensor) or not isinstance(vs, (tuple, list)) or len(vs) != len(self._params):
            raise ValueError(f"vs must be a tuple of {len(self._params)} tensors, one per parameter")
        vs = check_tensor_tuple("vs", vs)
        k = vs[0].shape[0] if vs[0].dim() > 0 else 0
        for i, (t, p) in enumerate(zip(vs, self._params)):
            if t.shape != (k, *p.shape):
                raise ValueError(f"vs[{i}] must have shape {(k, *p.shape)} ([k, *params[{i}].shape]), got {tuple(t.shape)}")
        if k < 1:
            raise ValueError("vs must hold k >= 1 vectors")
        self._check_vectors(vs)
        if k == 1:  # the vmap machinery costs more than it shares for one vector
            single = tuple(t[0] for t in vs)
            one = self._fwd_rev(single) if self.mode == "fwd-rev" else self._rev_rev(single, batched=False)
            out = tuple(t.unsqueeze(0) for t in one)
        elif self.mode == "fwd-rev":
            out = self._fwd_rev_batched(vs, chunk_size)
        else:
            out = self._rev_rev(vs, batched=True, chunk_size=chunk_size)
        self.num_products += k
        return self._average_products(out)

    __call__ = matvec

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self._released:
            raise RuntimeError("this HessianOperator was released (release() or context exit); build a new one")

    def _check_vectors(self, v: Tensors) -> None:
        for i, (t, p) in enumerate(zip(v, self._params)):
            if t.device != p.device:
                raise ValueError(f"v[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if t.dtype != p.dtype:
                raise TypeError(f"v[{i}] has dtype {t.dtype} but params[{i}] has dtype {p.dtype}")

    def _names_in(self, module: nn.Module) -> list[str]:
        by_id = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
        names = []
        for i, p in enumerate(self._params):
            if id(p) not in by_id:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of module")
            names.append("module." + by_id[id(p)])
        return names

    def _build_graph(self) -> tuple[list[torch.Tensor], list[int]]:
        with torch.enable_grad():
            loss = self._loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        # Only gradients that still depend on params carry second-order information.
        index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return [grads[i] for i in index], index

    def _rev_rev(self, v: Tensors, batched: bool, chunk_size: int | None = None) -> Tensors:
        if self.recompute:
            grads, index = self._build_graph()
            retain = batched and chunk_size is not None  # every chunk runs through this call's graph
        else:
            grads, index, retain = self._grads, self._grad_index, True
        if not index:
            return tuple(torch.zeros_like(t) for t in v)
        if not batched:
            hv = torch.autograd.grad(grads, self._params, [v[i] for i in index], retain_graph=retain, allow_unused=True)
            return tuple(torch.zeros_like(v[i]) if h is None else h.detach() for i, h in enumerate(hv))

        # torch.func.vmap rather than is_grads_batched: PyTorch's own convolution and BatchNorm backwards
        # have batching rules only under torch.func (the older vmap loops over the vectors for them).
        def product(*cotangents: torch.Tensor) -> Tensors:
            return torch.autograd.grad(grads, self._params, cotangents, retain_graph=retain, materialize_grads=True)

        return tuple(h.detach() for h in torch.func.vmap(product, chunk_size=chunk_size)(*(v[i] for i in index)))

    def _grad_fn(self) -> Callable[..., Tensors]:
        names = self._names
        wrapper = self._wrapper

        def loss_of(*ps: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(wrapper, dict(zip(names, ps)), (), strict=False)

        return torch.func.grad(loss_of, argnums=tuple(range(len(names))))

    def _fwd_rev(self, v: Tensors) -> Tensors:
        primals = tuple(p.detach() for p in self._params)
        grad_fn = self._grad_fn()
        with self._functional_context():
            _, hv = torch.func.jvp(grad_fn, primals, tuple(v))
        return tuple(h.detach() for h in hv)

    def _fwd_rev_batched(self, vs: Tensors, chunk_size: int | None) -> Tensors:
        primals = tuple(p.detach() for p in self._params)
        grad_fn = self._grad_fn()

        def product(*tangents: torch.Tensor) -> Tensors:
            return torch.func.jvp(grad_fn, primals, tangents)[1]

        with self._functional_context():
            hv = torch.func.vmap(product, chunk_size=chunk_size)(*vs)
        return tuple(h.detach() for h in hv)

    @contextlib.contextmanager
    def _functional_context(self) -> Iterator[None]:
        try:
            with _batch_stats_without_tracking(self._wrapper.module), torch.enable_grad():
                yield
        except RuntimeError as exc:
            if "must override the setup_context" in str(exc) or "does not have vmap support" in str(exc):
                raise RuntimeError(
                    "fwd-rev: loss_fn uses a torch.autograd.Function without torch.func support for this "
                    "product (it needs setup_context, a jvp rule, and for matmat generate_vmap_rule or a vmap "
                    "rule; the fused bissl_fast losses have them); use mode='rev-rev'"
                ) from exc
            if "mutate a captured Tensor" not in str(exc):
                raise
            raise RuntimeError(
                "fwd-rev: loss_fn mutated a tensor outside `module` inside torch.func.jvp, typically the "
                "running statistics of a train-mode BatchNorm that is not part of `module` (e.g. BYOL's "
                "target network); pass a module containing every network loss_fn runs, e.g. "
                "module=nn.ModuleList([online, target])"
            ) from exc

    def _average_products(self, out: Tensors) -> Tensors:
        if self._average is False or (self._average is None and not is_distributed()):
            return out
        return bucketed_mean(out)
