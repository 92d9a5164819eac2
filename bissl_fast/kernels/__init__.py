"""The ops' compute kernels, one module per op and backend (``<op>_triton.py``, ``<op>_torch.py``).

The Triton modules import triton, so they are imported only when a Triton launch is requested.
"""
