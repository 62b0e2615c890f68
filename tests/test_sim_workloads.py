"""Workload readers (Mooncake JSONL, BurstGPT CSV, Azure CSV), generators, time scaling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prfaas.sim.workloads import (
    Workload,
    bursty_poisson,
    load_azure,
    load_burstgpt,
    load_mooncake,
    load_workload,
    poisson_lognormal,
    rate_sweep,
)

TRACE = Path("../shared/traces/mooncake_synthetic_trace.jsonl")


def test_mooncake_small_file(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 1500, "input_length": 700, "output_length": 3, "hash_ids": [0, 1]},
        {"timestamp": 500, "input_length": 512, "output_length": 0, "hash_ids": [0]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = load_mooncake(p)
    assert w.arrival_s.tolist() == [0.0, 1.0]  # sorted, ms -> s, shifted to start at 0
    assert w.input_len.tolist() == [512, 700]
    assert w.output_len.tolist() == [1, 3]  # zero outputs count as one token
    assert w.hash_ids == [(0,), (0, 1)]
    assert load_workload(str(p)).input_len.tolist() == [512, 700]
    p.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad Mooncake record"):
        load_mooncake(p)


@pytest.mark.skipif(not TRACE.is_file(), reason="shared trace not present")
def test_mooncake_shared_trace():
    w = load_mooncake(TRACE)
    assert len(w) == 3993
    assert w.duration_s == pytest.approx(1022.025)
    assert all(len(h) == -(-n // 512) for h, n in zip(w.hash_ids, w.input_len, strict=True))


def test_burstgpt_csv_real_columns(tmp_path):
    p = tmp_path / "BurstGPT_1.csv"
    p.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,GPT-4,1087,0,1087,Conversation log\n"
        "47,ChatGPT,2000,300,2300,API log\n"
    )
    w = load_burstgpt(p)
    assert w.arrival_s.tolist() == [0.0, 42.0]  # the failed (0-token response) row is dropped
    assert w.input_len.tolist() == [472, 2000]
    assert w.output_len.tolist() == [18, 300]
    assert load_burstgpt(p, model="GPT-4", drop_failed=False).output_len.tolist() == [1]
    assert load_workload(str(p)).input_len.tolist() == [472, 2000]
    bad = tmp_path / "bad.csv"
    bad.write_text("Timestamp,Model,Request tokens\n1,x,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_burstgpt(bad)


def test_azure_csv_real_columns(tmp_path):
    p = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:46.6805900,879,0\n"
    )
    w = load_azure(p)
    assert w.arrival_s.tolist() == pytest.approx([0.0, 4.314579, 60.0])
    assert w.input_len.tolist() == [374, 396, 879]
    assert w.output_len.tolist() == [44, 109, 1]
    assert load_workload(str(p)).input_len.tolist() == [374, 396, 879]
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n")
    with pytest.raises(ValueError, match="bad Azure"):
        load_azure(p)


def test_time_scaling_and_rate():
    w = Workload("x", np.array([0.0, 1.0, 4.0]), np.array([5, 6, 7]), np.array([1, 1, 1]))
    assert w.rate == pytest.approx(0.5)
    assert w.time_scaled(2.0).arrival_s.tolist() == [0.0, 2.0, 8.0]
    assert w.with_rate(2.0).arrival_s.tolist() == pytest.approx([0.0, 0.25, 1.0])
    assert len(w.head(2)) == 2
    sw = rate_sweep(w, [0.5, 1.0, 4.0])
    assert [x.rate for x in sw] == pytest.approx([0.5, 1.0, 4.0])
    assert sw[2].arrival_s.tolist() == pytest.approx([0.0, 0.125, 0.5])
    assert all((x.input_len == w.input_len).all() for x in sw)
    with pytest.raises(ValueError):
        rate_sweep(w, [])
    with pytest.raises(ValueError):
        w.time_scaled(0)
    with pytest.raises(ValueError, match="non-decreasing"):
        Workload("x", np.array([1.0, 0.0]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError):
        load_workload("x.txt")


def test_generators():
    w = poisson_lognormal(2.0, 20000, seed=1)
    assert w.rate == pytest.approx(2.0, rel=0.03)
    assert w.input_len.min() >= 128 and w.input_len.max() <= 131072
    assert w.input_len.mean() == pytest.approx(27486, rel=0.03)  # the paper's mean ≈ 27K
    assert (w.output_len == 1024).all()
    b = bursty_poisson(2.0, 20000, burst_factor=4.0, burst_s=30, period_s=300, seed=1)
    assert b.rate == pytest.approx(2.0, rel=0.05)
    phase = b.arrival_s % 300 < 30
    # 30 s of 4x rate in each 300 s: 4*30 / (4*30 + 270) of arrivals fall in bursts
    assert phase.mean() == pytest.approx(120 / 390, abs=0.02)
    with pytest.raises(ValueError):
        poisson_lognormal(0.0, 10)
    with pytest.raises(ValueError):
        bursty_poisson(1.0, 10, burst_factor=0.5)
