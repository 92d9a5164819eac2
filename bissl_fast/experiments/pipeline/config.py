"""Settings of the pipeline: :class:`PipelineConfig` (one field per CLI flag and TOML key), their help
lines, the TOML reader, and which settings a resumed run must share with the run it continues."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..._validation import check_int_at_least, check_nonnegative, check_positive
from ...train.config import BiSSLConfig

_DATASETS = ("digits", "cifar10", "imagefolder")
_AUGMENTS = ("random", "paper", "flip")


@dataclass
class PipelineConfig:
    """Every setting of :func:`run_pipeline` (described in :data:`FIELD_HELP`); the CLI flags and TOML keys have these names.

    Batch sizes are global (split over ``torchrun`` ranks). The defaults are the paper's
    ImageNet/ResNet-50 recipe where it has one (the shipped config ``paper_resnet50`` spells them out);
    ``cpu_digits`` is a run that fits a CPU (see :func:`resolve_config`).
    """

    # data
    data: str = "digits"
    data_root: str | None = None
    pretext_data: str | None = None
    pretext_data_root: str | None = None
    image_size: int | None = None
    test_per_class: int = 30
    val_per_class: int = 10
    augment: str = "random"
    # model
    arch: str = "resnet50"
    pretext: str = "simclr"
    pretext_checkpoint: str | None = None
    pretext_head_checkpoint: str | None = None
    pretext_checkpoint_ignore: str | None = None
    projector_batchnorm: bool = True
    # pretext pretraining (only without pretext_checkpoint)
    pretext_epochs: int = 0
    pretext_batch_size: int = 1024
    pretext_lr: float = 4.8
    pretext_weight_decay: float = 1e-6
    pretext_warmup_epochs: int = 10
    # head warm-up (lr / weight decay default to the upper level's, as in the paper)
    warmup_epochs: int = 20
    warmup_lr: float | None = None
    warmup_weight_decay: float | None = None
    # BiSSL
    stages: int = 500
    lower_iters: int = 20
    upper_iters: int = 8
    lam: float = 0.001
    damping: float = 10.0
    cg_iters: int = 5
    temperature: float = 0.5
    byol_momentum: float = 0.9995
    concat_views: bool = False
    solver: str = "reuse"
    lower_lr: float = 1.0
    lower_weight_decay: float = 1e-6
    lower_momentum: float = 0.9
    lower_eta: float = 1e-3
    lower_warmup_steps: int = 200
    upper_lr: float = 0.03
    upper_weight_decay: float = 1e-3
    upper_momentum: float = 0.9
    downstream_batch_size: int = 256
    # fine-tuning
    finetune_epochs: int = 400
    finetune_batch_size: int = 256
    finetune_lr: float = 0.03
    finetune_weight_decay: float = 1e-4
    lr_search_trials: int = 0
    seeds: int = 10
    # runtime
    device: str = "auto"
    bf16: bool = False
    threads: int | None = None
    seed: int = 0
    out: str = "bissl_run"
    resume: bool = True
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name, choices in (("data", _DATASETS), ("augment", _AUGMENTS), ("pretext", ("simclr", "byol")),
                              ("solver", ("reuse", "recompute"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.pretext_data is not None and self.pretext_data not in _DATASETS:
            raise ValueError(f"pretext_data must be one of {_DATASETS}, got {self.pretext_data!r}")
        for name in ("pretext_epochs", "warmup_epochs", "stages", "lower_iters", "upper_iters", "finetune_epochs",
                     "lr_search_trials", "pretext_warmup_epochs", "lower_warmup_steps", "val_per_class", "seed"):
            check_int_at_least(name, getattr(self, name), 0)
        check_int_at_least("seeds", self.seeds, 1)
        check_int_at_least("test_per_class", self.test_per_class, 1)
        if self.lr_search_trials and not self.val_per_class:
            raise ValueError("lr_search_trials needs a validation split: set val_per_class > 0")
        check_int_at_least("cg_iters", self.cg_iters, 1)
        minimum = 2 if self.pretext == "simclr" else 1
        check_int_at_least("pretext_batch_size", self.pretext_batch_size, minimum)
        check_int_at_least("downstream_batch_size", self.downstream_batch_size, 1)
        check_int_at_least("finetune_batch_size", self.finetune_batch_size, 1)
        for name in ("pretext_lr", "warmup_lr", "lower_lr", "upper_lr", "finetune_lr", "temperature", "lower_eta"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        for name in ("pretext_weight_decay", "warmup_weight_decay", "lower_weight_decay", "upper_weight_decay",
                     "finetune_weight_decay", "lam", "damping", "lower_momentum", "upper_momentum"):
            if getattr(self, name) is not None:
                check_nonnegative(name, getattr(self, name))
        if self.threads is not None:
            check_int_at_least("threads", self.threads, 1)
        if self.image_size is not None:
            check_int_at_least("image_size", self.image_size, 4)
        if self.pretext_checkpoint_ignore is not None and not self.checkpoint_ignore_prefixes():
            raise ValueError("pretext_checkpoint_ignore names no key prefix; give comma-separated prefixes such as "
                             "'aux_head.,decoder.'")
        # BiSSLConfig checks the rest of the BiSSL settings (lam + damping > 0, byol_momentum range).
        self.bissl_config()

    def _check_types(self) -> None:
        """Each value has its field's type (a TOML file can hold any): bool, int, float (an int is
        taken as a float), str, or None where the field allows it."""
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = str(f.type).split(" | ")
            if value is None and "None" in kinds:
                continue
            if "bool" in kinds:
                ok, expected = isinstance(value, bool), "true or false"
            elif "int" in kinds:
                ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif "float" in kinds:
                ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
                if ok:
                    setattr(self, f.name, float(value))
            else:
                ok, expected = isinstance(value, str), "a string"
            if not ok:
                expected += " or unset" if "None" in kinds else ""
                raise TypeError(f"{f.name} must be {expected}, got {value!r}")

    def checkpoint_ignore_prefixes(self) -> tuple[str, ...]:
        """The key prefixes of ``pretext_checkpoint_ignore`` (comma-separated), in order."""
        return tuple(p.strip() for p in (self.pretext_checkpoint_ignore or "").split(",") if p.strip())

    def bissl_config(self) -> BiSSLConfig:
        return BiSSLConfig(
            pretext=self.pretext, lower_iters=self.lower_iters, upper_iters=self.upper_iters, lam=self.lam,
            damping=self.damping, cg_iters=self.cg_iters, temperature=self.temperature,
            byol_momentum=self.byol_momentum, concat_views=self.concat_views, solver=self.solver,
            progress=False,
        )


#: One line per setting: the ``bissl-fast run --help`` text.
FIELD_HELP = {
    "data": "downstream dataset: digits (scikit-learn, nothing downloaded), cifar10, imagefolder",
    "data_root": "folder of the cifar10 / imagefolder data",
    "pretext_data": "unlabeled data of pretraining and BiSSL's lower level (default: the labeled training images)",
    "pretext_data_root": "folder of pretext_data",
    "image_size": "resize images to this side (default: native size)",
    "test_per_class": "held-out test images per class (top-1 / top-5 are measured on them)",
    "val_per_class": "validation images per class (for the lr search)",
    "augment": "random (light batched augmentations, any channels), paper (the SimCLR/BYOL views and the "
               "fine-tuning crop+flip of bissl_fast.data.augment; RGB) or flip (deterministic views, for tests)",
    "arch": "backbone: tiny_cnn, tiny_resnet, small_resnet, resnet18_cifar, resnet18..resnet152 (timm/torchvision)",
    "pretext": "simclr or byol",
    "pretext_checkpoint": "pretext backbone weights (plain, the paper's, lightly, solo-learn, torchvision, DDP)",
    "pretext_head_checkpoint": "the paper's pretext head file (projector.* / predictor.* keys)",
    "pretext_checkpoint_ignore": "comma-separated key prefixes of pretext_checkpoint to leave out, besides the known "
                                 "classifiers, pretext heads and momentum copies (fc., head., classifier., projector., "
                                 "projection_head, momentum_, ...: bissl_fast.train.checkpoints.HEAD_PREFIXES)",
    "projector_batchnorm": "BatchNorm in the projector / predictor hidden layers (the paper's)",
    "pretext_epochs": "SimCLR/BYOL pretraining epochs when no pretext_checkpoint is given",
    "pretext_batch_size": "global pretext batch (images; 2 views each), also BiSSL's lower batch",
    "pretext_lr": "pretraining LARS learning rate",
    "pretext_weight_decay": "pretraining LARS weight decay",
    "pretext_warmup_epochs": "pretraining linear warm-up epochs (then cosine to 0.001 x lr)",
    "warmup_epochs": "head warm-up epochs (only the linear head trains)",
    "warmup_lr": "head warm-up SGD learning rate (default: upper_lr)",
    "warmup_weight_decay": "head warm-up weight decay (default: upper_weight_decay)",
    "stages": "BiSSL stages (each lower_iters lower + upper_iters upper steps)",
    "lower_iters": "lower (pretext) steps per stage",
    "upper_iters": "upper (downstream) steps per stage",
    "lam": "proximal weight between the lower and upper backbones",
    "damping": "added to lam in the implicit-gradient system",
    "cg_iters": "CG iterations per implicit gradient",
    "temperature": "NT-Xent temperature",
    "byol_momentum": "BYOL target EMA rate",
    "concat_views": "one forward on the concatenated views (the paper runs one per view)",
    "solver": "reuse (Hessian graph built once per upper stage) or recompute (the paper's)",
    "lower_lr": "lower-level LARS learning rate (warm-up then cosine over all lower steps)",
    "lower_weight_decay": "lower-level LARS weight decay",
    "lower_momentum": "lower-level LARS momentum",
    "lower_eta": "lower-level LARS trust coefficient",
    "lower_warmup_steps": "lower-level linear warm-up steps",
    "upper_lr": "upper-level SGD learning rate (cosine over all upper steps)",
    "upper_weight_decay": "upper-level SGD weight decay",
    "upper_momentum": "upper-level SGD momentum",
    "downstream_batch_size": "global downstream batch of the warm-up and the upper level",
    "finetune_epochs": "fine-tuning epochs per run",
    "finetune_batch_size": "global fine-tuning batch",
    "finetune_lr": "fine-tuning SGD learning rate (replaced by the search's choice when searching)",
    "finetune_weight_decay": "fine-tuning weight decay (replaced by the search's choice when searching)",
    "lr_search_trials": "random-search trials of (lr, weight decay) on the validation split, per initialization",
    "seeds": "fine-tuning seeds per initialization",
    "device": "auto, cpu, cuda or cuda:N (torchrun: LOCAL_RANK picks the GPU)",
    "bf16": "bf16 autocast in every stage (CUDA only)",
    "threads": "torch CPU threads",
    "seed": "seed of model initialization, splits and loaders",
    "out": "output folder (checkpoint.pt, log.jsonl, summary.json, bissl_backbones.pt)",
    "resume": "continue from <out>/checkpoint.pt when it exists",
    "tensorboard": "also write TensorBoard scalars (needs tensorboard)",
    "progress": "progress bars of every stage (tqdm when installed, else plain lines every 10 s)",
}

#: Fields that may differ between a run and its resume (they do not change the result).
RUNTIME_FIELDS = ("out", "resume", "tensorboard", "progress", "threads")


#: The configurations that ship with the package, one ``<name>.toml`` each.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> list[str]:
    """Names of the shipped configurations (``bissl-fast run --config <name>``)."""
    return sorted(name[:-len(".toml")] for name in os.listdir(CONFIG_DIR) if name.endswith(".toml"))


def resolve_config(name_or_path: str) -> str:
    """The TOML file of ``--config``: an existing file, else a shipped configuration's name (``cpu_digits``)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path in shipped_configs():
        return os.path.join(CONFIG_DIR, name_or_path + ".toml")
    if os.sep in name_or_path or name_or_path.endswith(".toml"):
        raise FileNotFoundError(f"config file {name_or_path!r} does not exist")
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a shipped config "
                            f"({', '.join(shipped_configs())})")


def config_from_toml(path: str | os.PathLike, **overrides: Any) -> PipelineConfig:
    """A :class:`PipelineConfig` from a TOML file of field names (flat, or in any tables), then ``overrides``."""
    import tomllib

    with open(path, "rb") as f:
        raw = tomllib.load(f)
    flat: dict[str, Any] = {}

    def collect(table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                collect(value)
            else:
                flat[key.replace("-", "_")] = value

    collect(raw)
    known = {f.name for f in fields(PipelineConfig)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{os.fspath(path)}: unknown keys {unknown}")
    flat.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**flat)


def fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}


__all__ = ["CONFIG_DIR", "FIELD_HELP", "RUNTIME_FIELDS", "PipelineConfig", "config_from_toml", "fingerprint",
           "resolve_config", "shipped_configs"]
