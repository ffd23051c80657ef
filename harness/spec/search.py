"""The ``search:`` section of an experiment spec: the parameters a sweep samples and its objective (typed
and checked like every section, ``harness.spec.sections``)."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from harness.spec.sections import _Section


Scalar = Union[bool, int, float, str]


class SearchParam(_Section):
    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Scalar, ...] | None = None

    @field_validator("choices", mode="before")
    @classmethod
    def _finite_choices(cls, v: Any) -> Any:
        import math

        for c in v if isinstance(v, (list, tuple)) else ():
            if isinstance(c, float) and not math.isfinite(c):
                raise ValueError(f"choice {c} is not a finite number")
        return v

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
        if self.step is not None and self.step <= 0:
            raise ValueError(f"'step' ({self.step}) must be positive")
        return self


def default_search_params(arch: Any = "lenet") -> dict[str, SearchParam]:
    """lr, momentum, and dropout where the harness adds it (not to a model factory's own model)."""
    params = {
        "optimizer.lr": SearchParam(type="float", low=1e-4, high=1.0, log=True),
        "optimizer.momentum": SearchParam(type="float", low=0.0, high=0.99),
        "model.dropout": SearchParam(type="float", low=0.0, high=0.7),
    }
    if isinstance(arch, str) and ":" in arch:
        del params["model.dropout"]
    return params


class SearchSpec(_Section):
    params: dict[str, SearchParam] = Field(default_factory=default_search_params)
    metric: str = "val/acc"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not v.startswith(("train/", "val/")):
            raise ValueError(f"the objective must be a per-epoch train/ or val/ metric, got {v[:60]!r} "
                             "(never tune on test/)")
        return v
