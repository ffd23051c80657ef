"""The search space of a sweep, and the sampler and pruner that explore it, built from the spec's
``search:`` block. Every range is checked against the spec's own field rules before a trial starts."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.samplers import BaseSampler

from harness.errors import SpecError
from harness.spec import SearchParam, Spec

MEDIAN_STARTUP_TRIALS = 5  # the median pruner needs a few whole curves before it judges others
GRID_MAX_POINTS = 10_000


def distributions(spec: Spec) -> dict[str, BaseDistribution]:
    """The spec's ``search.params`` as Optuna distributions; a bad block is a :class:`SpecError` naming
    the key. Both ends of every range are checked against the spec's own field rules up front, so no
    trial fails halfway through a sweep for a value the spec would refuse."""
    out: dict[str, BaseDistribution] = {}
    for key, p in spec.search.params.items():
        where = f"search.params.{key}"
        try:
            out[key] = _distribution(p)
        except (ValueError, TypeError) as e:
            raise SpecError(f"{where}: {e}") from None
        for end in _ends(out[key]):
            try:
                spec.with_overrides({key: end})
            except SpecError as e:
                raise SpecError(f"{where}: the value {end!r} in the search range is not valid for the "
                                f"spec ({str(e).split(': ', 1)[-1]}); narrow the range") from None
        inside = _inside(out[key])
        if inside is not None:
            try:
                spec.with_overrides({key: inside})
            except SpecError:  # the ends were whole numbers; a value between them is not
                raise SpecError(f"{where}: a float range, but {key} takes whole numbers only (the trials "
                                f"would fail on {inside!r}); write type: int") from None
    if not out:
        raise SpecError("search.params: nothing to search; declare at least one parameter")
    return out


def _distribution(p: SearchParam) -> BaseDistribution:
    if p.type == "categorical":
        return CategoricalDistribution(list(p.choices or ()))
    if p.type == "int":
        if p.low != int(p.low) or p.high != int(p.high) or (p.step is not None and p.step != int(p.step)):
            raise ValueError("an int parameter needs whole-number low, high and step")
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)


def _inside(d: BaseDistribution) -> float | None:
    """A value strictly inside a float range that no int field accepts (None for other ranges)."""
    if not isinstance(d, FloatDistribution):
        return None
    v = d.low + (d.high - d.low) * 0.37
    return v if v != int(v) else v + min(0.5, (d.high - v) / 2)


def _ends(d: BaseDistribution) -> list[Any]:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    return [d.low, d.high]  # type: ignore[attr-defined]


def grid(space: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every point of a grid search: choices, every int step, every float step. The size is checked
    before a single point is made (a careless step could ask for billions)."""
    counts = {key: _grid_count(key, d) for key, d in space.items()}
    size = math.prod(counts.values())
    if size > GRID_MAX_POINTS:
        raise SpecError(f"search.params: the grid has {size:,} points (more than {GRID_MAX_POINTS:,}); "
                        f"use larger steps or --sampler tpe")
    out: dict[str, list[Any]] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = list(d.choices)
        elif isinstance(d, IntDistribution):
            out[key] = list(range(d.low, d.high + 1, d.step))
        else:
            out[key] = [float(round(d.low + i * d.step, 12)) for i in range(counts[key])]  # type: ignore
    return out


def _grid_count(key: str, d: BaseDistribution) -> int:
    if isinstance(d, CategoricalDistribution):
        return len(d.choices)
    if isinstance(d, IntDistribution):
        return (d.high - d.low) // d.step + 1
    if d.step is None:  # type: ignore[union-attr]
        raise SpecError(f"search.params.{key}: the grid sampler needs a 'step' or 'choices' for "
                        f"a float parameter (or use --sampler tpe)")
    return int(round((d.high - d.low) / d.step)) + 1  # type: ignore[union-attr]


# -- sampler and pruner -----------------------------------------------------------------------------

class PerTrialSeedSampler(BaseSampler):
    """Reseeds the wrapped sampler from (spec seed, trial number) before every trial.

    One worker replays the same proposals for the same seed and history; several workers (processes
    or machines) draw from different streams instead of proposing the same random points."""

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int):
        self._factory, self._seed = factory, seed
        self._inner = factory(seed)

    def trial_seed(self, number: int) -> int:
        return int(np.random.SeedSequence([self._seed, number]).generate_state(1)[0])

    def before_trial(self, study, trial):
        self._inner = self._factory(self.trial_seed(trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        if isinstance(self._inner, optuna.samplers.GridSampler):
            return  # it calls study.stop(), which only works inside optimize(); we cap n_trials instead
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(name: str, spec: Spec, space: dict[str, BaseDistribution]) -> BaseSampler:
    if name == "random":
        factory: Callable[[int], BaseSampler] = lambda s: optuna.samplers.RandomSampler(seed=s)  # noqa: E731
    elif name == "grid":
        points = grid(space)
        factory = lambda s: optuna.samplers.GridSampler(points, seed=s)  # noqa: E731
    else:
        # constant_liar: a RUNNING trial counts as a bad result, so parallel workers spread out.
        factory = lambda s: optuna.samplers.TPESampler(seed=s, constant_liar=True)  # noqa: E731
    return PerTrialSeedSampler(factory, spec.seed)


def make_pruner(name: str, spec: Spec) -> optuna.pruners.BasePruner:
    epochs = spec.train.epochs
    if name == "median":
        # Judge from the second epoch on: the first epoch's val/acc mostly measures the init.
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS,
                                           n_warmup_steps=1 if epochs > 2 else 0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def grid_size(space: dict[str, BaseDistribution]) -> int:
    return math.prod(len(v) for v in grid(space).values())


