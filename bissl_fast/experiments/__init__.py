"""Applications built on the library: the main job and the paper's pipeline.

- :mod:`.demo` (``bissl-fast demo``): a replicated experiment, BiSSL against compute-matched continued
  pretext training, with its replicate runner :mod:`.demo_experiment`, its data/model set-up and the
  fingerprints of each replicate :mod:`.demo_setup`, its report and figure :mod:`.demo_report`, and the
  paired statistics of :mod:`.stats`;
- :mod:`.pipeline` (``bissl-fast run``): the paper's resumable pipeline, pretext checkpoint -> head
  warm-up -> BiSSL -> fine-tuning.

Imports the library core, ``train`` and ``data``; nothing imports from here but the CLI.
"""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(
    __name__, ("demo", "demo_experiment", "demo_report", "demo_setup", "pipeline", "stats"))
