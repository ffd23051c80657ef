"""A researcher's own code, named in a spec as ``package.module:factory``: found, checked, called.

The spec's directory and the current directory are importable (appended to ``sys.path``, so a
project's ``models.py`` never shadows an installed package). Every way this can go wrong (no such
module, no such attribute, arguments the factory does not take, a factory that raises) is one line
naming the spec field, raised as :class:`~harness.errors.SpecError`. Torch is not imported here.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from harness.errors import SpecError

_NAME = r"[A-Za-z_]\w*"
IMPORT_PATH = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$")


class FactoryError(ValueError):
    """An import path that cannot be used; the message does not name the spec field (the caller does)."""


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line never echoes a huge input back."""
    text = " ".join(repr(value).split())  # one line, whatever the repr (a tensor's has newlines)
    return text if len(text) <= limit else f"{text[:limit - 15]}...({len(text)} chars)"


def is_import_path(text: str) -> bool:
    return bool(IMPORT_PATH.match(text))


def add_search_path(directory: str | Path) -> None:
    """Make modules in ``directory`` importable (appended: installed packages keep precedence)."""
    d = str(Path(directory).resolve())
    if d not in sys.path:
        sys.path.append(d)


def resolve(path: str) -> Callable:
    """The callable named by ``package.module:attr`` (attr may be dotted: ``mod:Class.build``)."""
    if not is_import_path(path):
        raise FactoryError(f"{short(path)} is not an import path; write package.module:factory")
    add_search_path(os.getcwd())
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise FactoryError(f"no module named {e.name!r} (looked in the spec's directory, the current "
                               f"directory and the installed packages)") from None
        raise FactoryError(f"importing {module_name!r} failed: it needs {e.name!r}, which is not "
                           f"installed") from None
    except Exception as e:  # the module's own top-level code failed (SyntaxError, NameError, ...)
        raise FactoryError(f"importing {module_name!r} failed: {type(e).__name__}: {_first_line(e)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", None) or module_name
            raise FactoryError(f"{module_name!r} ({where}) has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"{path} is a value of type {type(obj).__name__}, not a function or class")
    return obj


def check_arguments(fn: Callable, path: str, fixed: dict[str, Any], args: dict[str, Any]) -> None:
    """Refuse, before any run, arguments the factory cannot take (``fixed`` are the harness's own)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C extension without a signature: find out when called
        return
    clash = sorted(set(fixed) & set(args))
    if clash:
        raise FactoryError(f"{clash[0]!r} is set by the harness; it cannot be one of the args")
    try:
        sig.bind(**fixed, **args)
    except TypeError as e:
        raise FactoryError(f"{path}{sig} cannot be called with "
                           f"{', '.join([*fixed, *args]) or 'no arguments'}: {e}") from None


def call(field: str, path: str, fn: Callable, **kwargs: Any) -> Any:
    """``fn(**kwargs)``; whatever it raises becomes one line naming ``field``."""
    try:
        return fn(**kwargs)
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"{field}: {path} raised {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else "(no message)"
