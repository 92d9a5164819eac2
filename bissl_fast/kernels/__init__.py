"""Triton kernels, imported lazily (only when a Triton launch is requested)."""
