"""The paper's whole BiSSL pipeline (docs/design.md §2.5) as one resumable run.

Stages, each checkpointed atomically into ``<out>/checkpoint.pt`` when it ends (BiSSL after every
BiSSL stage, fine-tuning after every run), so a killed run resumes where it stopped and ends with
the result of an uninterrupted one:

1. **pretext** -- load a pretext checkpoint into the backbone (any of the formats
   :func:`bissl_fast.train.checkpoints.load_weights` reads), or, without one, pretrain SimCLR/BYOL for
   ``pretext_epochs`` (LARS, linear warm-up + cosine);
2. **warmup** -- train only a fresh downstream linear head for ``warmup_epochs`` on the labeled
   split, the backbone frozen but in train mode (SGD, momentum 0.9);
3. **bissl** -- ``stages`` BiSSL stages (:class:`bissl_fast.BiSSLTrainer`): lower model = the
   pretext backbone + projector (BYOL target re-initialized to the online network), upper model =
   a copy of the backbone + the warmed-up head; LARS + warm-up/cosine below, SGD + cosine above;
4. **finetune** -- fine-tune from the LOWER BiSSL backbone with a fresh linear head (SGD momentum
   0.9, cosine), and the pretext backbone the same way as the baseline; an optional random search
   of lr / weight decay on a validation split, then ``seeds`` seeds at the chosen values; top-1
   (and top-5 with more than 5 classes) accuracy in percent on a held-out test split.

A resume is refused when the settings or the loaded data differ from the checkpoint's. Every stage
appends JSON lines to ``<out>/log.jsonl`` (losses, CG residuals, throughput, lr), and to TensorBoard
with ``tensorboard=True`` when it is installed, and shows a progress bar on rank 0. Under ``torchrun`` every
process runs this function; batches are split over ranks (the global batch sizes stay those of the
config), gradients are averaged over ranks, and rank 0 writes checkpoints and logs. :mod:`.report` turns a
finished run's ``summary.json`` into the README's pipeline block.
"""
from __future__ import annotations

from ..._lazy import lazy_submodules
from .cli import build_parser, main
from .config import FIELD_HELP, PipelineConfig, config_from_toml
from .runner import format_summary, run_pipeline
from .stages import evaluate

# `report` stays lazy: imported here, `python -m bissl_fast.experiments.pipeline.report` would find it already
# in sys.modules and runpy would warn.
__getattr__, __dir__ = lazy_submodules(__name__, ("report",))

__all__ = ["FIELD_HELP", "PipelineConfig", "build_parser", "config_from_toml", "evaluate", "format_summary", "main",
           "run_pipeline"]
