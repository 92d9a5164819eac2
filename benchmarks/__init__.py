"""The benchmark suites (pytest-benchmark files), shipped inside the package for ``bissl-fast bench``."""
