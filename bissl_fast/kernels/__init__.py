"""The ops' compute kernels, one module per op and backend (``<op>_triton.py``, ``<op>_torch.py``;
``nt_xent_triton_kernels.py`` holds the NT-Xent Triton kernels its launchers route to), the routes every
Triton launch takes (``triton_routes.py``) and their ahead-of-time resource check (``triton_aot.py``).

The Triton modules import triton, so they are imported only when a Triton launch is requested, or
on first attribute access (``bissl_fast.kernels.byol_triton``).
"""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(
    __name__, ("byol_triton", "nt_xent_torch", "nt_xent_triton", "nt_xent_triton_kernels", "triton_aot", "triton_routes")
)
