"""Reading YAML a researcher wrote, defensively: a regular, small, UTF-8 file; no repeated keys (YAML
would silently keep the last); no alias structure that expands to something huge. Each problem is one
:class:`SpecError` line naming the file (or the override) and what to do."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from harness.errors import SpecError

MAX_BYTES = 1 << 20  # a spec is a few KB; a megabyte is certainly something else
MAX_VALUES = 10_000  # values after alias expansion; a spec has a few dozen


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {str(key)[:60]!r} appears twice in one mapping (first at line "
                        f"{seen[key].line + 1}); YAML would keep only the last: remove one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse(text: str, where: str) -> Any:
    """YAML text -> Python data, or one SpecError line prefixed by ``where``."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise SpecError(f"{where}: malformed YAML{at}: {problem}") from None
    _bounded(data, where)
    return data


def read(path: Path) -> Any:
    """The parsed YAML of the spec file ``path`` (checked to be a readable, small, UTF-8 regular file)."""
    try:
        st = os.stat(path)  # follows links; never opens a FIFO or device (that would block or stream)
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found; pass the path of a YAML spec (see experiments/)") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec file ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{path}: is a directory; pass the path of a YAML spec file in it")
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{path}: not a regular file (a pipe or device?); pass the path of a YAML spec file")
    if st.st_size > MAX_BYTES:
        raise SpecError(f"{path}: {st.st_size} bytes is too large for a spec (at most {MAX_BYTES}); "
                        f"is this the right file?")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec file ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the "
                        f"spec as UTF-8") from None
    if "\x00" in text:
        raise SpecError(f"{path}: holds NUL bytes: a binary file, not a YAML spec")
    return parse(text.removeprefix("\ufeff"), str(path))


def _bounded(data: Any, where: str) -> None:
    # Aliases are shared references: `b: [*a, *a, ...]` nested a few times is tiny as text and as
    # objects, but every walk over it (validation, flattening, printing) visits each copy.
    count = 0
    stack = [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SpecError(f"{where}: the YAML expands to more than {MAX_VALUES} values (anchors and "
                            f"aliases nested in each other?); a spec holds a few dozen")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
