"""The sections of an experiment spec: data, model, optimizer, train (search: ``harness.spec.search``).
Typed and frozen; unknown keys, wrong types, non-finite numbers and out-of-range values are refused with
the field's path.

A message starting ``@field: `` names a field of the section itself (the loader prints
``section.field: ...``), for checks that look at two fields at once."""
from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

BUILTIN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
MAX_SEED = 2**32  # numpy's seeds are 0 <= seed < 2**32
MODEL_OPTIONS = ("dropout", "batchnorm", "noise_std")  # what the harness adds to the models that declare it


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: ValidationInfo) -> Any:
        """``train.epochs=true`` (or YAML's ``yes``) is not 1, as pydantic's lax mode would take it."""
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation in _NUMBERS:
            raise ValueError("expected a number, not a yes/no value")
        return v


_NUMBERS = (int, float, int | None, float | None)  # field types a yes/no value is refused for


def _seed(v: int) -> int:
    if not 0 <= v < MAX_SEED:
        raise ValueError(f"a seed must be a whole number with 0 <= seed < 2**32 ({MAX_SEED})")
    return v


def _args(v: dict[str, Any], owner: str) -> dict[str, Any]:
    """Keyword arguments for a factory: identifier names, plain YAML values (they become MLflow params)."""
    import math

    def check(x: Any, where: str, depth: int) -> None:
        if depth > 4:
            raise ValueError(f"{where}: nested too deeply (a factory's arguments are plain values)")
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"{where}: {x} is not a finite number")
        if isinstance(x, str) and len(x) > 500:
            raise ValueError(f"{where}: a {len(x)}-character string; keep arguments under 500 characters")
        if isinstance(x, (list, tuple)):
            for i, item in enumerate(x):
                check(item, f"{where}[{i}]", depth + 1)
        elif isinstance(x, dict):
            for k, item in x.items():
                if not isinstance(k, str) or not re.fullmatch(r"\w{1,64}", k):
                    raise ValueError(f"{where}: key {str(k)[:40]!r} must be 1-64 letters, digits and _")
                check(item, f"{where}.{k}", depth + 1)
        elif x is not None and not isinstance(x, (bool, int, float, str)):
            raise ValueError(f"{where}: {type(x).__name__} is not a plain YAML value")

    for name, value in v.items():
        if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
            raise ValueError(f"{str(name)[:40]!r} is not a keyword argument name for {owner} (a Python "
                             f"identifier of at most 64 characters: it becomes an MLflow param name)")
        check(value, name, 0)
    return v


class DataSpec(_Section):
    dataset: str = "digits"  # a built-in name or a factory: package.module:function
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments for a dataset factory
    num_classes: int | None = Field(None, ge=2)  # a factory's classes (default: largest label + 1)
    root: str = "data"  # where torchvision datasets live (<root>/MNIST/raw/...)
    download: bool = True
    loader: Literal["auto", "memory", "dataloader"] = "auto"  # auto: memory when the set fits
    num_workers: int = Field(0, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 0  # the validation split's own seed: every run and trial sees the same split
    batch_size: int = Field(100, ge=1)
    val_batch_size: int = Field(1000, ge=1)
    limit_train: int | None = Field(None, ge=1)  # keep only the first N training examples (quick runs)
    augment: bool = False  # random crop (padded) + horizontal flip of training batches, on the device

    @field_validator("split_seed")
    @classmethod
    def _split_seed(cls, v: int) -> int:
        return _seed(v)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from harness.core import imports

        if v in BUILTIN_DATASETS:
            return v
        if not imports.is_import_path(v):
            raise ValueError(f"unknown dataset {imports.short(v)}; choose one of {', '.join(BUILTIN_DATASETS)} "
                             f"or name your own factory as package.module:function")
        imports.resolve(v)
        return v

    @field_validator("args")
    @classmethod
    def _plain_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _args(v, "the dataset factory")

    @model_validator(mode="after")
    def _factory_fields(self) -> "DataSpec":
        from harness.core import imports

        if self.dataset in BUILTIN_DATASETS:
            for name, default in (("args", {}), ("num_classes", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"@{name}: only for a dataset factory (package.module:function); "
                                     f"{self.dataset} is built in")
        else:
            try:
                imports.check_arguments(imports.resolve(self.dataset), self.dataset, {}, self.args)
            except imports.FactoryError as e:
                raise ValueError(f"@args: {e}") from None
        return self


class ModelSpec(_Section):
    arch: str = "lenet"  # a registered name or a factory: package.module:function
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments for a model factory
    dropout: float = Field(0.0, ge=0, lt=1)
    batchnorm: bool = False
    noise_std: float = Field(0.0, ge=0)  # GaussianNoise layer, active only in training mode
    freeze: tuple[str, ...] = ()  # submodule paths kept frozen (no grad, eval mode), e.g. [features]

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from harness.core import imports

        if imports.is_import_path(v):
            imports.resolve(v)
            return v
        from harness.core.models import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown architecture {imports.short(v)}; choose one of {sorted(MODELS)} or "
                             f"name your own factory as package.module:function")
        return v

    @field_validator("args")
    @classmethod
    def _plain_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _args(v, "the model factory")

    @field_validator("freeze")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not re.fullmatch(r"[^\s.;]+(\.[^\s.;]+)*", p):  # get_submodule's dotted names
                raise ValueError(f"{p[:60]!r} is not a submodule path (e.g. features or backbone.layer4)")
        return v

    @model_validator(mode="after")
    def _declared_options(self) -> "ModelSpec":
        from harness.core import imports

        if imports.is_import_path(self.arch):
            try:
                imports.check_arguments(imports.resolve(self.arch), self.arch,
                                        {"input_shape": None, "num_classes": None}, self.args)
            except imports.FactoryError as e:
                raise ValueError(f"@args: {e}") from None
        fields = type(self).model_fields
        chosen = [n for n in (*MODEL_OPTIONS, "args")
                  if getattr(self, n) != fields[n].get_default(call_default_factory=True)]
        if not chosen:  # nothing to check (and no torch to import for the registry)
            return self
        if imports.is_import_path(self.arch):
            name = next((n for n in chosen if n != "args"), None)
            if name:
                raise ValueError(f"@{name}: the harness adds no {name} to your model ({self.arch}); "
                                 f"give it to your factory as model.args.{name}")
            return self
        from harness.core.models import MODELS

        declared = MODELS[self.arch].options
        for name in chosen:
            if name not in declared:
                raise ValueError(f"@{name}: {self.arch} has no such option (it takes "
                                 f"{', '.join(declared) or 'none of them'})")
        return self


class OptimizerSpec(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class TrainSpec(_Section):
    epochs: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)  # running loss every N batches
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: Literal["off", "bf16", "fp16"] = "off"  # mixed precision (fp16 with a GradScaler)
    deterministic: bool = False
    threads: Union[int, Literal["auto"], None] = None  # torch's CPU threads: harness/core/device.py
    channels_last: bool = False  # conv weights in NHWC memory format (faster convolutions on CPU)
    checkpoint: bool = True
    # Seconds between uploads of metrics, checkpoints and the guard's ledger (0: every epoch); always at
    # the end. A killed run resumes from the last upload (harness/uploads.py).
    upload_every_s: float = Field(10.0, ge=0)
    sanity_check: bool = True
    mc_samples: int = Field(10, ge=1)  # passes averaged by the mc_dropout policy
    log_model: bool = True

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if v not in (None, "auto") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError("expected a whole number of threads >= 1, or auto")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"unknown device {v[:40]!r}; use auto, cpu, cuda, cuda:N or mps")
        if v in ("auto", "cpu"):
            return v
        import torch  # only for an accelerator: is it on this machine?

        if v.startswith("cuda"):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(v.partition(":")[2] or 0)
            if n == 0:
                raise ValueError(f"this machine has no CUDA device (train.device={v}); use auto or cpu")
            if index >= n:
                raise ValueError(f"this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1} "
                                 f"(train.device={v})")
        elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("MPS (Apple GPUs) is not available on this machine (train.device=mps); "
                             "use auto or cpu")
        return v
