"""Simulator vs the planner (Eqs. 3-6) and the paper's Table 6 on the case study; the CLI."""

from __future__ import annotations

import json

import pytest

from prfaas.cli import main
from prfaas.sim.capacity import in_system_slope, max_sustained_rate
from prfaas.sim.engine import Simulator
from prfaas.sim.metrics import summarize
from prfaas.sim.setups import load_case_study
from prfaas.sim.workloads import poisson_lognormal

PAPER = {  # Table 6: Λ_max, mean TTFT, P90 TTFT
    "prfaas": (3.24, 2.22, 3.51),
    "homogeneous_pd": (2.11, 4.44, 9.73),
    "naive_heterogeneous": (2.45, 1.74, 3.51),
}


@pytest.fixture(scope="module")
def case():
    return load_case_study()


def test_planner_setups_match_table6(case):
    s = case.setups["prfaas"]
    assert (s.capacity.n_prfaas, s.capacity.n_p, s.capacity.n_d) == (4, 3, 5)
    assert s.capacity.threshold == pytest.approx(19400, rel=0.03)
    assert (
        case.setups["homogeneous_pd"].capacity.n_p,
        case.setups["homogeneous_pd"].capacity.n_d,
    ) == (9, 3)


@pytest.mark.parametrize("name", list(PAPER))
def test_sustained_rate_within_5pct_of_planner(case, name):
    s = case.setups[name]
    lam = s.capacity.lambda_max
    rate, probes = max_sustained_rate(
        s.deployment, s.make_policy, lam, horizon_s=12000, steps=5, tol=0.0075
    )
    assert rate == pytest.approx(lam, rel=0.05)
    assert rate == pytest.approx(PAPER[name][0], rel=0.05)
    assert any(not p.sustained for p in probes) and any(p.sustained for p in probes)


@pytest.mark.parametrize("name", list(PAPER))
def test_light_load_ttft_near_table6(case, name):
    s = case.setups[name]
    w = poisson_lognormal(0.1 * s.capacity.lambda_max, 1500, seed=7)
    m = summarize(Simulator(s.deployment, s.make_policy()).run(w))
    assert m["completed"] == 1500
    assert m["ttft"]["mean"] == pytest.approx(PAPER[name][1], rel=0.10)
    assert m["ttft"]["p90"] == pytest.approx(PAPER[name][2], rel=0.10)
    assert m["tpot"]["mean"] == pytest.approx(0.025)


def test_slope_criterion():
    assert in_system_slope(list(range(20)), [2 * t for t in range(20)], rate=4.0) == pytest.approx(
        0.5
    )
    with pytest.raises(ValueError):
        in_system_slope([0, 1], [0, 1], 1.0)
    with pytest.raises(ValueError):
        max_sustained_rate(None, None, guess=0.0)


def test_cli_json_report_and_errors(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["sim", "--requests", "300", "--out", str(out), "--json", "--no-progress"])
    assert rc == 0
    js = json.loads(capsys.readouterr().out)
    assert set(js) == {"prfaas", "homogeneous_pd", "naive_heterogeneous"}
    for v in js.values():
        assert v["completed"] == 300
        assert set(v["ttft"]) == {"mean", "p50", "p90", "p99"}
        assert {
            "throughput_rps",
            "tpot",
            "offload_fraction",
            "egress_gbps_mean",
            "cross_cluster_bytes",
        } <= set(v)
    assert (
        js["homogeneous_pd"]["offload_fraction"] == 0
        and js["homogeneous_pd"]["cross_cluster_bytes"] == 0
    )
    assert js["naive_heterogeneous"]["offload_fraction"] == 1
    assert {p.name for p in out.iterdir()} >= {
        "report.md",
        "series.png",
        "ttft_cdf.png",
        "summary.json",
    }
    assert main(["sim", "--systems", "nope", "--out", str(out)]) == 2
    assert "unknown systems" in capsys.readouterr().err
