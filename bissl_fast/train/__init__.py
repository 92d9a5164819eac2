"""The BiSSL trainer and what a bilevel run is assembled from (docs/design.md §2.4-§2.5).

- :mod:`.trainer` (:class:`BiSSLTrainer`), :mod:`.config` (:class:`BiSSLConfig`, the paper's values as
  defaults), :mod:`.stage` (one stage's log entry and implicit-gradient solver), :mod:`.losses` (the
  pretext losses as the trainer calls them), :mod:`.resume` (loader positions and RNG states);
- the model pieces: :mod:`.backbones` (built-in, timm, torchvision), :mod:`.heads` (the paper's
  projector / predictor, the linear classifier), :mod:`.models` (small ResNets for tests and the demo),
  :mod:`.ema` (BYOL's target network), :mod:`.optim` (LARS, warm-up + cosine), :mod:`.checkpoints`.

Imports the library core (ops, solver, nn) and nothing from ``data``, ``experiments`` or ``bench``.
"""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, (
    "backbones", "checkpoints", "config", "ema", "heads", "losses", "models", "optim", "resume", "stage", "trainer",
))
