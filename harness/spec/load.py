"""Loading a spec: a YAML file (or the defaults), then ``key.sub=value`` overrides, validated once."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.imports import add_search_path, short
from harness.errors import SpecError
from harness.spec import yamlfile
from harness.spec.experiment import Spec, set_dotted, validate
from harness.spec.search import default_search_params


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optimizer.lr=0.01", "model.freeze=[features]"]`` -> typed dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError(f"override {short(item)}: expected key.sub=value, e.g. optimizer.lr=0.01")
        if text == "":
            out[key] = ""
            continue
        try:
            out[key] = yamlfile.parse(text, f"override {short(key)}")
        except SpecError as e:
            if "malformed YAML" not in str(e):
                raise  # repeated keys, aliases expanding to something huge
            out[key] = text  # not YAML: the plain string (a name, a path)
    return out


def load_spec(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> Spec:
    """Read a YAML spec (or the defaults when path is None) and apply command-line overrides.

    The spec's directory becomes importable, so ``model.arch: models:small_cnn`` finds the
    ``models.py`` beside it."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        loaded = yamlfile.read(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SpecError(f"{p}: the spec must be a YAML mapping of sections, got {type(loaded).__name__}")
        raw = loaded
        add_search_path(p.parent)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        search = raw.get("search")
        if any(k.startswith("search.params.") for k in ov) and (search is None or (
                isinstance(search, dict) and "params" not in search)):
            # No search space in the file: `search.params.<key>...` overrides edit the default space
            # (one bound of optimizer.lr, one more parameter) rather than replace it with a fragment.
            model = raw.get("model")
            arch = ov.get("model.arch", model.get("arch", "lenet") if isinstance(model, dict) else "lenet")
            raw = {**raw, "search": {**(search or {}), "params": {
                k: p.model_dump(mode="json") for k, p in default_search_params(arch).items()}}}
        for key, value in ov.items():
            set_dotted(raw, key, value)
        source = f"{source} + overrides"
    return validate(raw, source=source)
