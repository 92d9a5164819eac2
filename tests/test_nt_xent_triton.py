"""NT-Xent Triton kernels (CPU tensors under TRITON_INTERPRET=1, or a GPU) against the fp64 reference.

The interpreter runs one 16 x 16 tile, so every shape here spans several row and column tiles, with
ragged last tiles and D not a power of two; the ``fixed_config`` tests run each route's own first
tile instead (what the GPU's fixed-config mode launches). Rows with D padded to at most 256 run the
resident kernels, except the fp32 "ieee" backward and double backward, which always run the K-loop
kernels (``ieee_resident``); the K-loop kernels for every pass are covered by the ``k_loop`` tests.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, assert_loss_grad_hvp_close, loss_grad_hvp, mlp_hvp, rel_err
from test_nt_xent import nt_xent_op_samples

from bissl_fast import NTXentFunction, nt_xent, reference
from bissl_fast.kernels import nt_xent_torch

triton = pytest.importorskip("triton")
tl = triton.language
from bissl_fast.kernels import triton_routes  # noqa: E402
from bissl_fast.kernels.nt_xent_triton import _dot_options  # noqa: E402
from bissl_fast.kernels.nt_xent_triton_kernels import _pv_dot  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # Raised inside triton's interpreter for every runtime loop bound; not ours to fix.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _pv_probe(p_ptr, v_ptr, out_ptr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, PV_BF16: tl.constexpr):
    """One 16 x 16 probability-value product through the kernels' ``_pv_dot``."""
    idx = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    acc = tl.zeros((16, 16), dtype=tl.float32)
    acc = _pv_dot(tl.load(p_ptr + idx), tl.load(v_ptr + idx), acc, PRECISION, UPCAST, PV_BF16)
    tl.store(out_ptr + idx, acc)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of each Triton entry point, proving the kernels (not the torch path) ran."""
    kernels = importlib.import_module("bissl_fast.kernels.nt_xent_triton")
    calls = {"lse_forward": 0, "lse_backward": 0, "lse_double_backward": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(kernels, name, counted)
    return calls


#: The kernels each route family launches: rows of padded D <= 256 stay resident (``ieee_resident``:
#: fp32 with exact dots, whose backward and double backward run the K-loop kernels), wider rows loop
#: over K.
KERNEL_FAMILIES = {
    "resident": {"_lse_fwd_resident_kernel", "_lse_bwd_resident_kernel", "_lse_bwd_bwd_r_resident_kernel",
                 "_lse_bwd_bwd_resident_kernel"},
    "ieee_resident": {"_lse_fwd_resident_kernel", "_lse_bwd_kernel", "_lse_bwd_bwd_r_kernel", "_lse_bwd_bwd_kernel"},
    "k_loop": {"_lse_fwd_kernel", "_lse_bwd_kernel", "_lse_bwd_bwd_r_kernel", "_lse_bwd_bwd_kernel"},
}


def family(dtype: torch.dtype, d: int, precision: str = "ieee") -> set[str]:
    """The kernels a loss, gradient and HVP launch for rows of ``dtype`` and width ``d``."""
    if d > 256:
        return KERNEL_FAMILIES["k_loop"]
    return KERNEL_FAMILIES["ieee_resident" if (dtype, precision) == (torch.float32, "ieee") else "resident"]


#: Widths per family: D = 20 and 7 pad to 64 (resident; one 64-wide K chunk where the ieee kernels
#: loop over K); D = 260 pads to 512 (K loop over 5 chunks of BLOCK_K = 64, the last 4 wide; outputs
#: in 2 chunks of BLOCK_DO = 256, the last 4 wide).
WIDTHS = {"resident": (20, 7), "k_loop": (260, 260)}


def _signature_type(arg) -> str:
    """The type triton's JIT gives a launch argument, as written in a route's signature."""
    if isinstance(arg, torch.Tensor):
        return triton_routes.pointer(arg.dtype)
    return {int: "i32", float: "fp32"}[type(arg)]


@pytest.fixture
def launched_kernels(monkeypatch):
    """Names of the Triton kernels launched during the test, proving which family the routes chose.
    Each launch's arguments must have its route's signature: the one the resource tests compile."""
    launched: set[str] = set()
    launch = triton_routes.Route.launch

    def recorded(self, grid, *args):
        launched.add(self.kernel.name)
        assert tuple(_signature_type(a) for a in args) == tuple(kind for _, kind in self.signature), self.name
        return launch(self, grid, *args)

    monkeypatch.setattr(triton_routes.Route, "launch", recorded)
    return launched


@pytest.mark.parametrize("n,d,views,tau", [(6, 3, 2, 0.5), (74, 100, 2, 0.1), (30, 130, 3, 0.05)])
def test_fp32_matches_fp64_reference(kernel_calls, n, d, views, tau):
    z = torch.randn(n, d, device=DEVICE)
    g, v = torch.tensor(0.7, device=DEVICE), torch.randn(n, d, device=DEVICE)
    out = loss_grad_hvp(lambda x: nt_xent(x, temperature=tau, views=views, backend="triton"), z, g, v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=tau, views=views), z.double(), g.double(), v.double())
    assert_loss_grad_hvp_close(out, ref, 1e-5)
    assert kernel_calls == {"lse_forward": 1, "lse_backward": 1, "lse_double_backward": 1}


def test_forward_over_reverse_hvp(kernel_calls):
    """``torch.func.jvp`` of ``torch.func.grad`` (the solver's "fwd-rev" product) runs on the kernels."""
    z = torch.randn(74, 100, device=DEVICE)
    v = torch.randn_like(z)
    loss_fn = lambda x: nt_xent(x, temperature=0.1, views=2, backend="triton")  # noqa: E731
    hvp = torch.func.jvp(torch.func.grad(loss_fn), (z,), (v,))[1]
    one = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.1), z.double(), one, v.double())[2]
    assert_close_rel("fwd-rev HVP", hvp, ref, 1e-5)
    assert kernel_calls["lse_double_backward"] >= 1


@pytest.mark.parametrize("d", [1, 5])
def test_single_sample(kernel_calls, d):
    """B = 1 with 3 views (each row's other two rows are both positives); D = 1 pads K to 16."""
    z = torch.randn(3, d, device=DEVICE)
    g, v = torch.tensor(1.0, device=DEVICE), torch.randn(3, d, device=DEVICE)
    out = loss_grad_hvp(lambda x: nt_xent(x, temperature=0.3, views=3, backend="triton"), z, g, v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.3, views=3), z.double(), g.double(), v.double())
    # With D = 1 the unit rows are +-1 and the derivatives are rounding noise around 0: loss only.
    if d > 1:
        assert_loss_grad_hvp_close(out, ref, 1e-5)
    else:
        assert_close_rel("loss", out[0], ref[0], 1e-5)
    assert kernel_calls == {"lse_forward": 1, "lse_backward": 1, "lse_double_backward": 1}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_wide_rows_use_k_loop_kernels(kernel_calls, launched_kernels, dtype, tol):
    """D = 300 pads to 512 > 256: the K-loop kernels (5 K chunks, 2 output chunks) instead of resident rows."""
    kernels = importlib.import_module("bissl_fast.kernels.nt_xent_triton")
    assert kernels.route("fwd", dtype, "ieee", 256).kernel.name == "_lse_fwd_resident_kernel"
    assert kernels.route("fwd", dtype, "ieee", 257).kernel.name == "_lse_fwd_kernel"
    z = torch.randn(20, 300, device=DEVICE).to(dtype)
    g, v = torch.tensor(0.9, device=DEVICE), torch.randn(20, 300, device=DEVICE).to(dtype)
    out = loss_grad_hvp(lambda x: nt_xent(x, temperature=0.2, backend="triton"), z, g.to(dtype), v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.2), z.double(), g.double(), v.double())
    assert_loss_grad_hvp_close(out, ref, tol)
    assert kernel_calls == {"lse_forward": 1, "lse_backward": 1, "lse_double_backward": 1}
    assert launched_kernels == KERNEL_FAMILIES["k_loop"]


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("n,d,views", [(74, 100, 2), (30, 256, 3)])
def test_rows_up_to_256_use_resident_kernels(launched_kernels, n, d, views, precision):
    """Padded D <= 256 (here 128 and exactly 256) keeps the rows resident: in all four kernels with
    TF32 dots, in the forward with exact dots (whose backward and double backward loop over K).
    The interpreter's dots are exact either way, so both precisions meet the fp32 tolerance here."""
    z, v = torch.randn(n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    g = torch.tensor(1.1, device=DEVICE)
    loss = lambda x: nt_xent(x, temperature=0.2, views=views, backend="triton", precision=precision)  # noqa: E731
    out = loss_grad_hvp(loss, z, g, v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.2, views=views), z.double(), g.double(), v.double())
    assert_loss_grad_hvp_close(out, ref, 1e-5 if precision == "ieee" or DEVICE == "cpu" else 3e-4)
    assert launched_kernels == family(torch.float32, d, precision)


@pytest.mark.parametrize(
    "dtype,precision,d,tol",
    [(torch.float32, "ieee", 256, 1e-5), (torch.float32, "tf32", 256, 1e-5), (torch.bfloat16, "ieee", 256, 1e-2),
     (torch.float32, "ieee", 100, 1e-5), (torch.float32, "ieee", 300, 1e-5)],
)
def test_route_tiles_in_fixed_config_mode(monkeypatch, launched_kernels, dtype, precision, d, tol):
    """With the fixed-config mode each route launches its own first tile (here 32 to 128 rows and
    columns, several of them over N = 70) instead of the interpreter's 16 x 16: loss, gradient and
    HVP still match the fp64 reference, e.g. on the fp32 D = 256 routes that BiSSL's HVPs take."""
    monkeypatch.setenv(triton_routes.FIXED_CONFIG_ENV, "1")
    z, v = torch.randn(70, d, device=DEVICE).to(dtype), torch.randn(70, d, device=DEVICE).to(dtype)
    g = torch.tensor(0.8, device=DEVICE)
    loss = lambda x: nt_xent(x, temperature=0.3, backend="triton", precision=precision)  # noqa: E731
    out = loss_grad_hvp(loss, z, g.to(dtype), v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.3), z.double(), g.double(), v.double())
    assert_loss_grad_hvp_close(out, ref, tol if precision == "ieee" or DEVICE == "cpu" else 3e-4)
    assert launched_kernels == family(dtype, d, precision)


def test_hvp_through_model_matches_reference(kernel_calls):
    x = torch.randn(40, 5, device=DEVICE)
    out = mlp_hvp(lambda e: nt_xent(e, temperature=0.2, views=2, backend="triton"), x, 20)
    ref = mlp_hvp(lambda e: reference.nt_xent(e, temperature=0.2, views=2), x.double(), 20)
    assert_close_rel("HVP w.r.t. the MLP parameters", out, ref, 1e-5)
    assert kernel_calls["lse_double_backward"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(kernel_calls, dtype):
    z = torch.randn(38, 100, device=DEVICE).to(dtype)
    g, v = torch.tensor(1.3, device=DEVICE), torch.randn(38, 100, device=DEVICE).to(dtype)
    out = loss_grad_hvp(lambda x: nt_xent(x, temperature=0.2, backend="triton"), z, g.to(dtype), v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.2), z.double(), g.double(), v.double())
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[2].dtype == dtype
    assert_loss_grad_hvp_close(out, ref, 1e-2)
    assert kernel_calls == {"lse_forward": 1, "lse_backward": 1, "lse_double_backward": 1}


@pytest.mark.parametrize(
    "width,dtype,precision,tols",
    [
        ("resident", torch.float32, "ieee", (1e-6, 1e-5)),
        ("resident", torch.float32, "tf32", (1e-6, 1e-5)),
        ("k_loop", torch.float32, "ieee", (1e-6, 1e-5)),
        # 16-bit rows: the probability-value products run in bf16 (see _pv_dot).
        ("resident", torch.bfloat16, "ieee", (1e-2, 1e-2)),
        ("k_loop", torch.bfloat16, "ieee", (1e-2, 1e-2)),
    ],
)
def test_kernels_match_chunked_path_with_weighted_rows(launched_kernels, width, dtype, precision, tols):
    """Each kernel against the chunked torch formulas (fp64, on the same rounded inputs) with
    non-uniform ``c`` (both signs) and a random cotangent, for every route family. ``tf32`` runs
    on CPU only (the interpreter's dots are exact), like the rest of this test's tolerances."""
    if precision == "tf32" and DEVICE != "cpu":
        pytest.skip("TF32 dots are not exact on a GPU: test_large_batch_on_gpu covers them")
    kernels = importlib.import_module("bissl_fast.kernels.nt_xent_triton")
    n, d, inv_tau = 35, WIDTHS[width][0], 1 / 0.3
    lse_tol, tol = tols
    u = F.normalize(torch.randn(n, d, device=DEVICE), dim=1).to(dtype)
    c, w = torch.randn(n, device=DEVICE), torch.randn(n, d, device=DEVICE).to(dtype)
    u64, c64, w64 = u.double(), c.double(), w.double()
    lse64 = nt_xent_torch.lse_forward(u64, inv_tau, "ieee")
    lse = kernels.lse_forward(u, inv_tau, precision)
    assert_close_rel("lse", lse, lse64, lse_tol)
    du = kernels.lse_backward(u, lse, c, inv_tau, precision)
    assert du.dtype == dtype
    assert_close_rel("backward", du, nt_xent_torch.lse_backward(u64, lse64, c64, inv_tau, "ieee"), tol)
    grad_u, r = kernels.lse_double_backward(u, lse, c, w, inv_tau, precision)
    grad_u64, r64 = nt_xent_torch.lse_double_backward(u64, lse64, c64, w64, inv_tau, "ieee")
    assert grad_u.dtype == dtype and r.dtype == torch.float32
    assert_close_rel("double backward grad_u", grad_u, grad_u64, tol)
    assert_close_rel("double backward r", r, r64, tol)
    assert launched_kernels == family(dtype, d, precision)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_probability_weights_survive_16_bit_products(dtype):
    """``c_i P_ij`` is ~1/N^2 for the loss (c = 1/N, P ~ 1/N): ~1e-9 at N = 32768, below fp16's
    smallest subnormal (6e-8). The probability-value products must not flush it to zero."""
    p = 1e-9 * torch.rand(16, 16, device=DEVICE)
    v = torch.randn(16, 16, device=DEVICE).to(dtype)
    out = torch.empty(16, 16, device=DEVICE)
    _pv_probe[(1,)](p, v, out, **_dot_options("ieee", dtype, pv=True))
    assert rel_err(out, p.double() @ v.double()) < 1e-2


@pytest.mark.parametrize("width", ["resident", "k_loop"])
def test_lse_function_double_backward_wrt_weights(kernel_calls, launched_kernels, width):
    """Gradient of the backward w.r.t. the upstream ``lse`` grad (``grad_c = r / tau``) on Triton."""
    d = WIDTHS[width][1]
    u = F.normalize(torch.randn(18, d, device=DEVICE), dim=1).requires_grad_()
    c = torch.randn(18, device=DEVICE, requires_grad=True)
    w = torch.randn(18, d, device=DEVICE)
    u64 = u.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()

    def second(fn, uu, cc):
        (du,) = torch.autograd.grad(fn(uu), uu, cc, create_graph=True)
        return torch.autograd.grad(du, (uu, cc), w.to(uu.dtype))

    out = second(lambda x: NTXentFunction.apply(x, 0.4, "triton", "ieee"), u, c)
    ref = second(lambda x: NTXentFunction.apply(x, 0.4, "torch", "ieee"), u64, c64)
    assert_close_rel("second derivatives (u, c)", out, ref, 1e-5)
    assert kernel_calls["lse_double_backward"] == 1
    assert launched_kernels == family(torch.float32, d)


def test_huge_and_tiny_norm_rows(kernel_calls):
    z = torch.randn(20, 33, device=DEVICE)
    z[::3] *= 1e15
    z[1::3] *= 1e-8
    g, v = torch.tensor(0.5, device=DEVICE), torch.randn(20, 33, device=DEVICE)
    out = loss_grad_hvp(lambda x: nt_xent(x, temperature=0.1, backend="triton"), z, g, v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.1), z.double(), g.double(), v.double())
    assert_loss_grad_hvp_close(out, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_custom_ops(dtype):
    """The three custom ops on the Triton backend pass torch.library.opcheck (fake kernels included)."""
    for op, args in nt_xent_op_samples("triton", dtype, DEVICE):
        torch.library.opcheck(op, args)


def test_triton_rejects_float64():
    with pytest.raises(TypeError, match="backend='triton' supports"):
        nt_xent(torch.randn(8, 4, dtype=torch.float64, device=DEVICE), backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype,precision,tol",
    [(torch.float32, "ieee", 1e-5), (torch.float32, "tf32", 3e-4), (torch.bfloat16, "ieee", 1e-2),
     (torch.float16, "ieee", 1e-2)],
)
def test_large_batch_on_gpu(kernel_calls, dtype, precision, tol):
    """N = 8192: tiles of the GPU autotune configs, probabilities ~1/N, fp64 reference on the GPU."""
    n, d = 8192, 128
    z = torch.randn(n, d, device="cuda").to(dtype)
    g, v = torch.tensor(1.0, device="cuda"), torch.randn(n, d, device="cuda").to(dtype)
    out = loss_grad_hvp(lambda x: nt_xent(x, temperature=0.1, backend="triton", precision=precision), z, g, v)
    ref = loss_grad_hvp(lambda x: reference.nt_xent(x, temperature=0.1), z.double(), g.double(), v.double())
    assert_loss_grad_hvp_close(out, ref, tol)
    assert kernel_calls == {"lse_forward": 1, "lse_backward": 1, "lse_double_backward": 1}
