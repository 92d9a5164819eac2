"""The fused losses, one module per op (``nt_xent``, ``byol``); public names are re-exported by ``bissl_fast``."""
