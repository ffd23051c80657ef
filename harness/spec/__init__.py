"""The experiment spec: YAML file + ``key.sub=value`` overrides -> one typed, frozen, validated object.

Every user mistake becomes a :class:`~harness.errors.SpecError` whose message is one line naming the
field path (or the file). ``sections`` holds the typed sections (``search`` the sweep's), ``experiment``
the whole spec and what is derived from it, ``load`` reading a file and overrides, ``yamlfile`` reading
YAML defensively.
"""
from harness.spec.experiment import EVAL_ONLY_KEYS, Spec, flatten
from harness.spec.load import load_spec, parse_overrides
from harness.spec.search import SearchParam, SearchSpec
from harness.spec.sections import BUILTIN_DATASETS, DataSpec, ModelSpec, OptimizerSpec, TrainSpec

__all__ = ["BUILTIN_DATASETS", "EVAL_ONLY_KEYS", "DataSpec", "ModelSpec", "OptimizerSpec", "SearchParam",
           "SearchSpec", "Spec", "TrainSpec", "flatten", "load_spec", "parse_overrides"]
