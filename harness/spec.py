"""The experiment spec: YAML file + ``key.sub=value`` overrides -> one typed, frozen, validated object.

Every user mistake becomes a :class:`SpecError` whose message is one line naming the field path.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import SpecError

# Spec keys that only evaluation reads: an arm of an ablation that differs from its control only here
# (and in an evaluation-only mode_bug) is scored on the control's own checkpoints.
EVAL_ONLY_KEYS = frozenset({"data.val_batch_size", "train.mc_samples", "guard"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataSpec(_Section):
    dataset: Literal["digits", "mnist", "fashion_mnist"] = "digits"
    root: str = "data"  # where torchvision datasets live (<root>/MNIST/raw/...)
    download: bool = True
    loader: Literal["memory", "dataloader"] = "memory"  # dataloader: torchvision + DataLoader, for big sets
    num_workers: int = Field(0, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 0  # the validation split's own seed: every run and trial sees the same split
    batch_size: int = Field(100, ge=1)
    val_batch_size: int = Field(1000, ge=1)
    limit_train: int | None = Field(None, ge=1)  # keep only the first N training examples (quick runs)


class ModelSpec(_Section):
    arch: str = "lenet"
    dropout: float = Field(0.0, ge=0, lt=1)
    batchnorm: bool = False
    noise_std: float = Field(0.0, ge=0)  # GaussianNoise layer, active only in training mode
    freeze: tuple[str, ...] = ()  # submodule names kept frozen (no grad, eval mode), e.g. [features]

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from harness.core.models import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown architecture {v!r}; choose one of {sorted(MODELS)}")
        return v


class OptimizerSpec(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class TrainSpec(_Section):
    epochs: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)  # running loss every N batches
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    deterministic: bool = False
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None = torch's default
    channels_last: bool = False  # conv weights in NHWC memory format (faster convolutions on CPU)
    checkpoint: bool = True
    sanity_check: bool = True
    mc_samples: int = Field(10, ge=1)  # passes averaged by the mc_dropout policy
    log_model: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        base = v.split(":")[0]
        if base not in ("auto", "cpu", "cuda", "mps") or (":" in v and base != "cuda"):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v


Scalar = Union[bool, int, float, str]


class SearchParam(_Section):
    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Scalar, ...] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "SearchParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale parameter needs 'low' > 0")
        return self


def _default_search_params() -> dict[str, SearchParam]:
    return {
        "optimizer.lr": SearchParam(type="float", low=1e-4, high=1.0, log=True),
        "optimizer.momentum": SearchParam(type="float", low=0.0, high=0.99),
        "model.dropout": SearchParam(type="float", low=0.0, high=0.7),
    }


class SearchSpec(_Section):
    params: dict[str, SearchParam] = Field(default_factory=_default_search_params)
    metric: str = "val/acc"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not v.startswith(("train/", "val/")):
            raise ValueError(f"the objective must be a per-epoch train/ or val/ metric, got {v!r} "
                             "(never tune on test/)")
        return v


class Spec(_Section):
    name: str = "default"  # the MLflow experiment
    seed: int = 0
    mode_bug: str = "none"  # a policy registered in harness.core.modes
    guard: Literal["warn", "raise", "off"] = "warn"
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)

    @field_validator("mode_bug")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from harness.core.modes import POLICIES

        if v not in POLICIES:
            raise ValueError(f"unknown mode bug {v!r}; choose one of {', '.join(POLICIES)}")
        return v

    @field_validator("guard", mode="before")
    @classmethod
    def _guard_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` (guard: off, guard=off) as the boolean false.
        return "off" if v is False else v

    @model_validator(mode="after")
    def _search_keys_exist(self) -> "Spec":
        flat = flatten(self.model_dump(exclude={"search"}))
        for key in self.search.params:
            if key not in flat:
                raise ValueError(f"search.params: {key!r} is not a spec key (e.g. optimizer.lr)")
        return self

    # -- derived ---------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The flattened spec with dotted keys, as logged to MLflow (the search space is not a param)."""
        return flatten(self.model_dump(mode="json", exclude={"search"}))

    def hash(self) -> str:
        """Stable short hash of everything that determines the run's numbers."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> "Spec":
        """A new spec with dotted-key overrides applied and validated again."""
        raw = self.model_dump(mode="json")
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return _validate(raw, source="overrides")


# -- loading -------------------------------------------------------------------------------------

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optimizer.lr=0.01", "model.freeze=[features]"]`` -> typed dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError(f"override {item!r}: expected key.sub=value, e.g. optimizer.lr=0.01")
        try:
            out[key] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            out[key] = text
    return out


def load_spec(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> Spec:
    """Read a YAML spec (or the defaults when path is None) and apply command-line overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise SpecError(f"{p}: spec file not found; pass the path of a YAML spec (see experiments/)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise SpecError(f"{p}: malformed YAML{where}: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SpecError(f"{p}: the spec must be a YAML mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        search = raw.get("search")
        if any(k.startswith("search.params.") for k in ov) and (search is None or (
                isinstance(search, dict) and "params" not in search)):
            # No search space in the file: `search.params.<key>...` overrides edit the default space
            # (one bound of optimizer.lr, one more parameter) rather than replace it with a fragment.
            raw = {**raw, "search": {**(search or {}), "params": {
                k: p.model_dump(mode="json") for k, p in _default_search_params().items()}}}
        for key, value in ov.items():
            _set_dotted(raw, key, value)
        source = f"{source} + overrides"
    return _validate(raw, source=source)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    # search.params keys themselves contain dots: everything after "search.params." is one key.
    if key.startswith("search.params."):
        parts = ["search", "params"] + _split_search_key(key[len("search.params."):])
    else:
        parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _split_search_key(rest: str) -> list[str]:
    # "optimizer.lr.high" -> ["optimizer.lr", "high"]; "optimizer.lr" -> ["optimizer.lr"]
    fields = set(SearchParam.model_fields)
    head, _, last = rest.rpartition(".")
    return [head, last] if head and last in fields else [rest]


def _validate(raw: dict[str, Any], source: str) -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{source}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key (check the spelling; see the spec reference in README.md)"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    shown = "" if kind in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {msg}{shown}" if path else f"{msg}{shown}"
