"""The one config-file loader: YAML or JSON into a mapping, one error style, strict dataclasses;
the deployment, planner, simulator and profile configs all read through it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from prfaas.config_file import build_dataclass, dump_yaml, read_mapping
from prfaas.scheduling.plan_config import load_plan_config
from prfaas.scheduling.profile import load_profiles
from prfaas.server.config import load_deploy_config


@dataclass
class Box:
    a: int
    b: str = "x"


def test_read_mapping_yaml_json_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(dump_yaml({"z": 1, "a": [1, 2], "m": {"k": "v"}}))
    assert read_mapping(y) == {"z": 1, "a": [1, 2], "m": {"k": "v"}}
    assert list(read_mapping(y)) == ["z", "a", "m"]  # order kept
    j = tmp_path / "c.json"
    j.write_text('{"a": 1}')
    assert read_mapping(j) == {"a": 1}
    with pytest.raises(ValueError, match="no such config file.*the deployment config does not"):
        read_mapping(tmp_path / "nope.yaml", "deployment config")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_mapping(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_mapping(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        read_mapping(tmp_path / "list.yaml")


def test_build_dataclass_is_strict():
    assert build_dataclass(Box, {"a": 1}, "box") == Box(1)
    with pytest.raises(ValueError, match=r"box: unknown keys \['c'\]"):
        build_dataclass(Box, {"a": 1, "c": 2}, "box")
    with pytest.raises(ValueError, match="box: .*missing"):
        build_dataclass(Box, {}, "box")
    with pytest.raises(ValueError, match="box: expected a mapping"):
        build_dataclass(Box, [1], "box")


def test_every_config_reads_through_it(tmp_path):
    for load in (load_deploy_config, load_plan_config, load_profiles):
        with pytest.raises(ValueError, match="no such config file"):
            load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    for load in (load_deploy_config, load_plan_config, load_profiles):
        with pytest.raises(ValueError, match="top level must be a mapping"):
            load(tmp_path / "list.yaml")
