"""Where in the user's script something happened, and what the script calls it: the file:line of the
frame that called a model or ``optimizer.step()``, and the variable name the model has there."""
from __future__ import annotations

import importlib.util
import os
import sys
from types import FrameType

import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_GUARD_DIR = os.path.dirname(__file__) + os.sep


def _package_dirs(*names: str) -> tuple[str, ...]:
    """Where these packages live, found without importing them."""
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        dirs += [os.path.join(d, "") for d in (spec.submodule_search_locations or [])] if spec else []
    return tuple(dirs)


# Frames in these are never the user's line: Lightning calls the model and optimizer.step() for you.
_LIBRARY = (_TORCH_DIR, _GUARD_DIR) + _package_dirs("pytorch_lightning", "lightning", "lightning_fabric")

Site = tuple  # (filename, lineno)
# Forwards torch runs on purpose, not phases of the script: swa_utils.update_bn (training mode to
# re-estimate BatchNorm statistics), activation checkpointing (a no_grad forward, recomputed in backward).
DELIBERATE_FUNCTIONS = ("update_bn",)
DELIBERATE_FILES = (os.path.join(_TORCH_DIR, "utils", "checkpoint.py"),)


def caller() -> FrameType | None:
    """The innermost frame outside torch and the guard (the user's line that called the model or the
    optimizer); None when a torch function runs the model in training mode on purpose."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith(_LIBRARY):
            return frame
        if code.co_filename in DELIBERATE_FILES or (
                code.co_name in DELIBERATE_FUNCTIONS and code.co_filename.startswith(_TORCH_DIR)):
            return None
        frame = frame.f_back
    return None


def site_of(frame: FrameType | None) -> Site:
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)


def format_site(site: Site) -> str:
    """``file:line``, the file relative to the working directory when it lies below it."""
    path, line = site
    if os.path.isabs(path):
        rel = os.path.relpath(path)
        path = path if rel.startswith("..") else rel
    return f"{path}:{line}"


def name_in(frame: FrameType | None, obj: object, fallback: str) -> str:
    """The name ``obj`` has in ``frame``: a local or global variable (``model``, ``netD``), an attribute
    of ``self`` (``encoder`` for ``self.encoder``), else ``fallback``."""
    if frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            for name, value in scope.items():
                if (value is obj or _wraps(value, obj)) and name != "self" and not name.startswith("_"):
                    return name
        owner = frame.f_locals.get("self")
        if owner is not None and owner is not obj:
            for name, value in _attributes(owner):
                if value is obj:
                    return name
    return fallback


def _wraps(value: object, obj: object) -> bool:
    """Lightning's ``opt = self.optimizers()`` is a wrapper around the optimizer."""
    try:
        return getattr(value, "_optimizer", None) is obj
    except Exception:  # noqa: BLE001 - an object whose __getattr__ raises anything
        return False


def _attributes(owner: object):
    modules = getattr(owner, "_modules", None)
    if isinstance(modules, dict):
        yield from modules.items()
    try:
        yield from vars(owner).items()
    except TypeError:  # no __dict__
        return
