"""The experiment spec: one typed, frozen, validated object made of the sections, plus what is derived
from it (the flattened params MLflow records, the hash that identifies the numbers, the YAML)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from harness.core.imports import short
from harness.errors import SpecError

from harness.spec.search import SearchSpec, default_search_params
from harness.spec.sections import DataSpec, ModelSpec, OptimizerSpec, TrainSpec, _seed, _Section

# Spec keys that only evaluation reads: an arm of an ablation that differs from its control only here
# (and in an evaluation-only mode_bug) is scored on the control's own checkpoints.
EVAL_ONLY_KEYS = frozenset({"data.val_batch_size", "train.mc_samples", "guard"})


class Spec(_Section):
    name: str = Field("default", min_length=1, max_length=200)  # the MLflow experiment (and in run names)
    seed: int = 0
    mode_bug: str = "none"  # a policy registered in harness.core.modes
    guard: Literal["warn", "raise", "off"] = "warn"
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)

    @model_validator(mode="before")
    @classmethod
    def _default_space(cls, raw: Any) -> Any:
        # No search space written: the default one, without model.dropout for a model factory's own
        # model (the harness adds no dropout to it).
        if not isinstance(raw, dict):
            return raw
        search, model = raw.get("search"), raw.get("model")
        if search is None or (isinstance(search, dict) and "params" not in search):
            arch = model.get("arch", "lenet") if isinstance(model, dict) else "lenet"
            raw = {**raw, "search": {**(search or {}), "params": {
                k: p.model_dump(mode="json") for k, p in default_search_params(arch).items()}}}
        return raw

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        return _seed(v)

    @field_validator("mode_bug")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from harness.core.modes import POLICIES

        if v not in POLICIES:
            raise ValueError(f"unknown mode bug {v[:60]!r}; choose one of {', '.join(POLICIES)}")
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
                raise ValueError(f"search.params: {key[:80]!r} is not a spec key (e.g. optimizer.lr)")
            if key.startswith("model.") and key.split(".")[1] in ("dropout", "batchnorm", "noise_std") \
                    and ":" in self.model.arch:
                raise ValueError(f"search.params: {key} does nothing to your model ({self.model.arch}); "
                                 f"search its factory's argument (model.args.NAME) instead")
        return self

    # -- derived ---------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The flattened spec with dotted keys, as logged to MLflow (the search space is not a param).
        Factory arguments flatten too: ``model.args.width``. An unset ``data.num_classes`` is left out:
        the run logs the number it found under that name."""
        flat = flatten(self.model_dump(mode="json", exclude={"search"}))
        if flat.get("data.num_classes") is None:
            flat.pop("data.num_classes", None)
        return flat

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
            set_dotted(raw, key, value)
        return validate(raw, source="overrides")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``key`` ``a.b.c``, making sections as needed."""
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
            raise SpecError(f"override {short(key)}: {'.'.join(parts[:i + 1])[:80]} is not a section")
        node = child
    node[parts[-1]] = value


def _split_search_key(rest: str) -> list[str]:
    # "optimizer.lr.high" -> ["optimizer.lr", "high"]; "optimizer.lr" -> ["optimizer.lr"]
    from harness.spec.search import SearchParam

    head, _, last = rest.rpartition(".")
    return [head, last] if head and last in SearchParam.model_fields else [rest]


def validate(raw: dict[str, Any], source: str) -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{source}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    kind = err["type"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    across = msg.startswith("@")
    if across:  # a check across fields names its own field: "@args: ..." -> path.args
        field, _, msg = msg[1:].partition(": ")
        path = f"{path}.{field}" if path else field
    path = path if len(path) <= 120 else f"{path[:100]}...({len(path)} chars)"
    if kind == "extra_forbidden":
        return f"{path}: unknown key (check the spelling; see the spec reference in README.md)"
    got = err.get("input")
    shown = "" if kind in ("missing",) or isinstance(got, dict) or across else f" (got {short(got)})"
    return f"{path}: {msg}{shown}" if path else f"{msg}{shown}"
