"""Benchmark tooling: the report of ``bissl-fast bench`` (:mod:`.report`), interleaved timing, floors and
machine-load checks (:mod:`.timing`), peak memory (:mod:`.memory`), the per-layer-type profile of a
Hessian product and an upper stage (:mod:`.profile_hvp`), and the pytest-benchmark suites shipped
with the package (``suites``, the repository's ``benchmarks/`` folder).

Imports the library core and ``train`` (the models the profiles run).
"""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, ("memory", "profile_hvp", "report", "timing"))
