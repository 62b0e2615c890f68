"""``--tensor-parallel-size`` on the command lines and in the deployment file: sizes a model
cannot be split into are refused with one line (exit 2) before anything starts; a node's own size
overrides the deployment's; ``prfaas generate -tp 2`` prints TP=1's greedy tokens;
``benchmarks/tp_scaling.py`` runs its CPU path (TP 1 and 2, a 2 -> 1 hand-off) at tiny size."""

from __future__ import annotations

import json
import os

import pytest

from prfaas.cli import main
from prfaas.server.config import load_deploy_config, parse_deploy_config


@pytest.fixture(autouse=True)
def _bounded_collectives(monkeypatch):
    monkeypatch.setenv("PRFAAS_TP_TIMEOUT_S", "300")


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_generate_and_serve_refuse_sizes_that_do_not_divide(capsys):
    err = _refused(["generate", "--model", "tiny", "--device", "cpu", "-tp", "4"], capsys)
    assert err.startswith("prfaas generate: error:") and "kda_num_heads 2" in err
    err = _refused(["serve", "tiny", "--device", "cpu", "--port", "0", "-tp", "3"], capsys)
    assert err.startswith("prfaas serve: error:") and "tensor_parallel_size 3" in err


def test_node_refuses_a_size_that_does_not_divide(capsys):
    err = _refused(["node", "--node", "pd-d0", "--tensor-parallel-size", "4"], capsys)
    assert "node 'pd-d0'" in err and "does not divide" in err


def _deploy_dict(**node_kw) -> dict:
    cfg = load_deploy_config().to_dict()
    cfg["clusters"][1]["nodes"][1].update(node_kw)
    for c in cfg["clusters"]:
        c.pop("pool_master", None), c.pop("pool_metadata", None)
    cfg.pop("config_dir", None)
    return cfg


def test_deploy_config_sizes_per_node():
    d = _deploy_dict(tensor_parallel_size=2)
    d["engine"] = {"tensor_parallel_size": 1}
    cfg = parse_deploy_config(d)
    assert cfg.node_engine_config("pd-d0").tensor_parallel_size == 2
    assert cfg.node_engine_config("pd-p0").tensor_parallel_size == 1
    d["engine"] = {"tensor_parallel_size": 2}
    d["clusters"][1]["nodes"][1]["tensor_parallel_size"] = 0  # 0: the deployment's
    assert parse_deploy_config(d).node_engine_config("pd-d0").tensor_parallel_size == 2
    with pytest.raises(ValueError, match="node 'pd-d0': tensor_parallel_size 4 does not divide"):
        parse_deploy_config(_deploy_dict(tensor_parallel_size=4))
    bad = _deploy_dict(tensor_parallel_size=2)
    bad["prefix_pool"] = True
    bad["router"]["cache_mode"] = "scarce"
    with pytest.raises(ValueError, match="prefix_pool"):
        parse_deploy_config(bad)


def test_generate_tp2_prints_the_tp1_tokens(capsys):
    argv = ["generate", "--model", "tiny", "--device", "cpu", "--max-tokens", "6", "--json"]
    outs = []
    for tp in ("1", "2"):
        assert main([*argv, "-tp", tp, "Hello tensor parallel"]) == 0
        lines = capsys.readouterr().out.splitlines()
        outs.append(json.loads(lines[0])["token_ids"])
    assert len(outs[0]) == 6 and outs[0] == outs[1]


def test_tp_scaling_benchmark_cpu_path(tmp_path):
    from benchmarks.tp_scaling import main as bench
    from prfaas import EngineConfig, LLMEngine, SamplingParams

    res = bench(
        [
            "--model", "tiny", "--device", "cpu", "--tp", "1,2,4", "--prompt-len", "48",
            "--reps", "1", "--decode-batch", "2", "--decode-context", "24",
            "--decode-steps", "2", "--handoff", "2:1", "--handoff-len", "40",
            "--handoff-tokens", "5", "--out", str(tmp_path / "tp"),
        ]
    )  # fmt: skip
    assert [r["tp"] for r in res["tp"]] == [1, 2]
    assert res["tp"][0]["prefill_efficiency"] == 1.0
    assert all(r["decode_step_s"] > 0 and "decode_efficiency" in r for r in res["tp"])
    assert res["skipped"][0]["tp"] == 4 and "kda_num_heads" in res["skipped"][0]["reason"]
    assert os.path.exists(tmp_path / "tp.json") and "TP2 -> TP1" in (tmp_path / "tp.md").read_text()
    # the hand-off decoded what one TP=1 instance decodes
    from benchmarks.tp_scaling import _prompt

    eng = LLMEngine(EngineConfig(model="tiny", device="cpu"))
    eng.add_request(
        _prompt(40, 7, 384), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    )
    out = []
    while eng.has_unfinished():
        out += [o for o in eng.step() if o.finished]
    assert res["handoff"][0]["token_ids"] == out[-1].token_ids
