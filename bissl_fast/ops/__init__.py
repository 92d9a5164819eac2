"""The fused losses, one module per op (``nt_xent``, ``byol``, ``batch_norm``); public names are re-exported by
``bissl_fast``, and their ``*_batching`` companions hold the batching rules (k tangents per call). Each module is
imported on first access (``bissl_fast.ops.byol``)."""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(
    __name__, ("batch_norm", "batch_norm_batching", "byol", "byol_batching", "nt_xent", "nt_xent_batching"))
