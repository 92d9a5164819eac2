"""The fused losses, one module per op (``nt_xent``, ``byol``, ``batch_norm``); public names are re-exported by
``bissl_fast``. Each module is imported on first access (``bissl_fast.ops.byol``)."""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, ("batch_norm", "byol", "nt_xent"))
