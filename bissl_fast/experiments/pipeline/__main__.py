"""``python -m bissl_fast.experiments.pipeline``: the same as ``bissl-fast run``."""
from .cli import main

raise SystemExit(main())
