"""The one loader of the project's config files (deployment, planner/simulator case study, hardware
profiles): YAML (or JSON by suffix) into a mapping, with one error style, plus the strict helper
that builds a dataclass from a mapping and refuses unknown keys.

Every failure is ``ValueError`` naming the file (or the section ``where``); the callers parse the
mapping further, strictly, into their own types.  Imports only the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The top-level mapping of a YAML file (``.json``: JSON); ValueError if the file is missing,
    does not parse, or does not hold a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such config file: {p} (the {what} does not exist)")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        raise ValueError(f"{p}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    """``data`` as YAML that ``read_mapping`` reads back (keys in the given order)."""
    return yaml.safe_dump(data, sort_keys=False)


def build_dataclass(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)``, refusing a non-mapping, unknown keys and missing ones (ValueError naming
    ``where`` and the known keys)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    try:
        return cls(**data)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
