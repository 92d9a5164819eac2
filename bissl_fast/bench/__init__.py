"""Benchmark tooling: the report of ``bissl-fast bench`` (:mod:`.report`), interleaved timing, floors and
machine-load checks (:mod:`.timing`), peak memory (:mod:`.memory`), the per-layer-type profile of a
Hessian product and an upper stage (:mod:`.profile_hvp`), the regression checks' arithmetic and their
false-alarm rate measured from repeated runs (:mod:`.regression`), the suite runs of ``bissl-fast bench``
(:mod:`.suite_runs`), and the pytest-benchmark suites shipped
with the package (``suites``, the repository's ``benchmarks/`` folder).

Imports the library core and ``train`` (the models the profiles run).
"""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, ("memory", "profile_hvp", "regression", "report", "suite_runs", "timing"))
