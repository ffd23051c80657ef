"""The plan of an ablation study: the ablation spec (YAML), its arms as experiment specs, and how each
arm is scored: by its own training runs, or, when it changes only evaluation, on its control's
checkpoints. Everything is built and validated here, so a mistake stops the study before its first run.

The ablation spec::

    name: digits-mode-bugs          # also the MLflow experiment, unless `experiment:` is given
    base: ../digits_lenet_modes.yaml   # an experiment spec, relative to this file
    overrides: {train.epochs: 10}   # applied to the base for every arm (optional)
    seeds: 10                       # or a list of seeds
    control: none                   # the default control arm (added with no changes if not listed)
    metric: test/acc                # the headline metric
    arms:
      - name: no_eval
        set: {mode_bug: no_eval}
      - name: partial_freeze
        set: {mode_bug: partial_freeze, model.freeze: [features]}
        control: frozen_features    # an arm's own control
        score: auto                 # auto | train | checkpoint
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.core.modes import POLICIES
from harness.errors import SpecError
from harness.spec import EVAL_ONLY_KEYS, Spec, load_spec, parse_overrides

# The ablation needs checkpoints and guard verdicts, and has no use for the final model artifact.
FORCED = {"train.checkpoint": True, "train.log_model": False, "guard": "warn"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArmSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=200)
    set: dict[str, Any] = Field(default_factory=dict)  # dotted spec overrides, e.g. {mode_bug: no_eval}
    control: str | None = None  # None: the ablation's control (the control arm itself has none)
    score: Literal["auto", "train", "checkpoint"] = "auto"
    note: str = ""


class AblationSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=200)
    base: str
    experiment: str | None = Field(None, min_length=1, max_length=500)
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: int | list[int] = 10
    control: str = "none"
    metric: Literal["test/acc", "val/acc", "test/loss", "val/loss"] = "test/acc"
    workers: int = Field(1, ge=1)
    arms: list[ArmSpec] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if isinstance(v, int):
            if v < 1:
                raise ValueError("seeds must be >= 1 (a count) or a list of seeds")
        elif not v or len(set(v)) != len(v):
            raise ValueError("a list of seeds must be non-empty and without repeats")
        return v


@dataclass
class Arm:
    name: str
    spec: Spec  # with the base seed; the seed is replaced per run
    control: str | None
    scored: str  # "train" | "checkpoint"
    note: str = ""

    @property
    def is_control(self) -> bool:
        return self.control is None


@dataclass
class Ablation:
    spec: AblationSpec
    path: Path
    base: Spec
    arms: dict[str, Arm]
    seeds: list[int]

    @property
    def experiment(self) -> str:
        return self.spec.experiment or self.spec.name

    def with_threads(self, threads: int) -> "Ablation":
        """Every arm with ``train.threads`` set to one count: a setting that changes float summation
        order, so it goes into the base spec the parent records (``--resume`` reads it back), the arms'
        specs, their params and hashes, where ``harness.train`` can reproduce it. A spec that sets a
        number of its own keeps it; ``auto`` is replaced by the count given."""
        if self.base.train.threads not in (None, "auto"):
            return self
        arms = {n: replace(a, spec=a.spec.with_overrides({"train.threads": threads}))
                for n, a in self.arms.items()}
        return replace(self, base=self.base.with_overrides({"train.threads": threads}), arms=arms)

    def arm_spec(self, arm: str, seed: int) -> Spec:
        return self.arms[arm].spec.with_overrides({"seed": seed, "name": self.experiment})


def load_ablation(path: str | Path, overrides: list[str] | dict | None = None, *,
                  seeds: int | list[int] | None = None, only: Sequence[str] | None = None,
                  base: Spec | None = None) -> Ablation:
    """Read and check an ablation spec: every arm's experiment spec is built and validated here, so a
    mistake stops the study before the first run. ``overrides`` apply to the base spec of every arm;
    ``seeds`` replaces the seed list (a count: ``range(seeds)``); ``only`` keeps those arms (and their
    controls); ``base``: the base spec as a resumed ablation recorded it (instead of the file's)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: ablation spec not found (see experiments/ablations/)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: an ablation spec is a YAML mapping (name, base, seeds, arms)")
    try:
        ab = AblationSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise SpecError(f"{p}: {where}: {msg}") from None

    if base is None:
        base_path = (p.parent / ab.base).resolve()
        if not base_path.is_file():
            raise SpecError(f"{p}: base: experiment spec {ab.base!r} not found (relative to {p.parent})")
        base = load_spec(base_path, {**ab.overrides, **_as_dict(overrides)})
    base = base.with_overrides(FORCED)  # none of these changes a number the runs measure

    arm_specs = list(ab.arms)
    if ab.control not in {a.name for a in arm_specs}:
        arm_specs.insert(0, ArmSpec(name=ab.control))
    names = [a.name for a in arm_specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SpecError(f"{p}: arms: duplicate arm name(s) {sorted(dup)}")

    arms: dict[str, Arm] = {}
    for i, a in enumerate(arm_specs):
        try:
            spec = base.with_overrides(a.set)
        except SpecError as e:
            raise SpecError(f"{p}: arms[{a.name}].set: {str(e).removeprefix('overrides: ')}") from None
        control = None if a.name == ab.control else (a.control or ab.control)
        if control is not None and control not in names:
            raise SpecError(f"{p}: arms[{a.name}].control: no arm named {control!r}")
        if control == a.name:
            raise SpecError(f"{p}: arms[{a.name}].control: an arm cannot be its own control")
        arms[a.name] = Arm(a.name, spec, control, a.score, a.note)

    for a in arms.values():
        a.scored = _scoring(p, a, arms)
    if only:
        unknown = [n for n in only if n not in arms]
        if unknown:
            raise SpecError(f"--arms: unknown arm(s) {unknown}; arms: {', '.join(arms)}")
        keep = set(only)
        for n in list(keep):
            c = arms[n].control
            while c is not None:  # an arm needs its control, and that control its own
                keep.add(c)
                c = arms[c].control
        arms = {n: a for n, a in arms.items() if n in keep}
    chosen = ab.seeds if seeds is None else seeds
    seed_list = list(range(chosen)) if isinstance(chosen, int) else list(chosen)
    return Ablation(ab, p, base, arms, seed_list)


def _scoring(path: Path, arm: Arm, arms: dict[str, Arm]) -> str:
    """``checkpoint`` when the arm changes only evaluation relative to its control, else ``train``."""
    if arm.control is None or arm.scored == "train":
        return "train"
    control = arms[arm.control]
    a, c = arm.spec.params(), control.spec.params()
    differ = sorted(k for k in set(a) | set(c) if a.get(k) != c.get(k) and k != "mode_bug")
    problems = []
    if any(k not in EVAL_ONLY_KEYS for k in differ):
        problems.append(f"it changes {', '.join(k for k in differ if k not in EVAL_ONLY_KEYS)}, which "
                        f"training sees")
    if POLICIES[arm.spec.mode_bug].scope == "train":
        problems.append(f"mode_bug={arm.spec.mode_bug} changes training")
    if POLICIES[control.spec.mode_bug].scope != "none":
        problems.append(f"its control {control.name!r} is not trained with the correct loop")
    if control.control is not None and _scoring(path, control, arms) == "checkpoint":
        problems.append(f"its control {control.name!r} is itself scored on checkpoints")
    if not problems:
        return "checkpoint"
    if arm.scored == "checkpoint":
        raise SpecError(f"{path}: arms[{arm.name}].score: checkpoint is impossible: {'; '.join(problems)}")
    return "train"


def _as_dict(overrides) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    return parse_overrides(list(overrides))
