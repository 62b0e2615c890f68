"""prfaas.bench workloads and prompts: trace loading, synthetic arrivals, caps, hash_id prefixes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from prfaas.bench.prompts import PromptBuilder
from prfaas.bench.workload import BenchRequest, load_trace, prepare, synthetic_lognormal
from prfaas.model.tokenizer import ByteTokenizer

SHARED_TRACE = (
    Path(__file__).resolve().parents[1] / "../shared/traces/mooncake_synthetic_trace.jsonl"
)


def write_trace(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_trace_sorts_shifts_and_converts(tmp_path: Path) -> None:
    p = write_trace(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 1500, "input_length": 700, "output_length": 3, "hash_ids": [0, 1]},
            {"timestamp": 1000, "input_length": 512, "output_length": 0, "hash_ids": [0]},
            {"timestamp": 3250, "input_length": 10, "output_length": 7},
        ],
    )
    reqs = load_trace(p)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 2.25]
    assert [(r.input_len, r.output_len, r.hash_ids) for r in reqs] == [
        (512, 1, (0,)),  # output 0 -> 1 token
        (700, 3, (0, 1)),
        (10, 7, ()),
    ]
    assert [r.index for r in reqs] == [0, 1, 2]
    assert len(load_trace(p, limit=2)) == 2


def test_load_trace_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such trace"):
        load_trace(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        load_trace(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text(
        '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"x": 1}\n'
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad Mooncake record"):
        load_trace(tmp_path / "bad.jsonl")
    (tmp_path / "neg.jsonl").write_text('{"timestamp": 0, "input_length": 0, "output_length": 1}\n')
    with pytest.raises(ValueError, match="input_length must be >= 1"):
        load_trace(tmp_path / "neg.jsonl")
    with pytest.raises(ValueError, match="limit"):
        load_trace(tmp_path / "bad.jsonl", limit=-1)


@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason="shared trace not present")
def test_load_shared_mooncake_trace() -> None:
    reqs = load_trace(SHARED_TRACE)
    assert len(reqs) == 3993
    assert [r.arrival_s for r in reqs[:4]] == [0.0, 0.0, 0.04, 0.277]
    assert (reqs[0].input_len, reqs[0].output_len, reqs[0].hash_ids[:3]) == (40160, 6, (0, 1, 2))
    assert 15000 < np.mean([r.input_len for r in reqs]) < 15600  # "mean input 15.3K tokens"
    # one id per 512-token block
    assert all(len(r.hash_ids) == -(-r.input_len // 512) for r in reqs)


def test_synthetic_lognormal() -> None:
    a = synthetic_lognormal(4.0, 2000, output_len=32, seed=3)
    b = synthetic_lognormal(4.0, 2000, output_len=32, seed=3)
    assert a == b
    assert a != synthetic_lognormal(4.0, 2000, output_len=32, seed=4)
    t = np.array([r.arrival_s for r in a])
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert (len(a) - 1) / t[-1] == pytest.approx(4.0, rel=0.08)  # Poisson at 4 req/s
    lens = np.array([r.input_len for r in a])
    assert lens.min() >= 128 and lens.max() <= 131072
    assert np.median(lens) == pytest.approx(np.exp(9.90), rel=0.1)  # log-normal median e^mu
    assert {r.output_len for r in a} == {32} and all(r.hash_ids == () for r in a)
    for bad in (dict(rate=0.0, num_requests=5), dict(rate=1.0, num_requests=0)):
        with pytest.raises(ValueError):
            synthetic_lognormal(**bad)
    with pytest.raises(ValueError, match="output length"):
        synthetic_lognormal(1.0, 5, output_len=0)


def test_prepare_time_scale_and_caps() -> None:
    reqs = [BenchRequest(i, 0.1 * i, 1000 * (i + 1), 10 * (i + 1), (i,)) for i in range(5)]
    out = prepare(reqs, time_scale=2.5, max_requests=3, max_input_tokens=1500, max_output_tokens=15)
    assert [r.arrival_s for r in out] == pytest.approx([0.0, 0.25, 0.5])
    assert [(r.input_len, r.output_len) for r in out] == [(1000, 10), (1500, 15), (1500, 15)]
    assert [r.hash_ids for r in out] == [(0,), (1,), (2,)]
    assert prepare(reqs) == reqs
    skipped = prepare(reqs, time_scale=2.0, skip_requests=2, max_requests=2)
    assert [r.hash_ids for r in skipped] == [(2,), (3,)]
    assert [r.arrival_s for r in skipped] == pytest.approx([0.0, 0.2])  # from the first kept one
    for kw, msg in (
        (dict(time_scale=0.0), "--time-scale"),
        (dict(time_scale=float("inf")), "--time-scale"),
        (dict(max_requests=0), "--max-requests"),
        (dict(max_input_tokens=0), "--max-input-tokens"),
        (dict(max_output_tokens=-1), "--max-output-tokens"),
        (dict(skip_requests=-1), "--skip-requests"),
    ):
        with pytest.raises(ValueError, match=msg):
            prepare(reqs, **kw)


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_prompts_share_prefixes_exactly_as_hash_ids_agree() -> None:
    pb = PromptBuilder(block_tokens=512, seed=0)
    a = pb.prompt(BenchRequest(0, 0.0, 1800, 1, (7, 8, 9, 10)))
    b = pb.prompt(BenchRequest(1, 0.0, 2048, 1, (7, 8, 11, 12)))
    c = pb.prompt(BenchRequest(2, 0.0, 1024, 1, (3, 8)))
    assert (len(a), len(b), len(c)) == (1800, 2048, 1024)
    tok = ByteTokenizer()
    for p in (a, b, c):
        assert p.isascii() and len(tok.encode(p)) == len(p)  # one byte = one token
    assert a[:1024] == b[:1024]  # ids 7, 8 agree
    assert a[1024:1536] != b[1024:1536]  # 9 vs 11
    assert 1024 <= common_prefix(a, b) < 1536
    assert common_prefix(a, c) < 512  # differ from the first block on
    # a block's text depends on its id only; what is shared is the prefix up to the first mismatch
    assert c[512:1024] == a[512:1024] == pb.block(8)
    # a capped prompt is a prefix of the full prompt
    assert pb.prompt(BenchRequest(0, 0.0, 700, 1, (7, 8, 9, 10))) == a[:700]
    # deterministic across builders, different with another seed
    assert PromptBuilder(512, seed=0).prompt(BenchRequest(0, 0.0, 1800, 1, (7, 8, 9, 10))) == a
    other = PromptBuilder(512, seed=1).prompt(BenchRequest(0, 0.0, 1800, 1, (7, 8, 9, 10)))
    assert common_prefix(a, other) < 512


def test_prompt_filler_is_unique_per_request() -> None:
    pb = PromptBuilder(block_tokens=16, seed=0)
    x = pb.prompt(BenchRequest(0, 0.0, 40, 1, (1,)))  # blocks: id 1, then filler
    y = pb.prompt(BenchRequest(1, 0.0, 40, 1, (1,)))
    assert x[:16] == y[:16] == pb.block(1)
    assert 16 <= common_prefix(x, y) < 32
    u = pb.prompt(BenchRequest(5, 0.0, 33, 1))
    v = pb.prompt(BenchRequest(6, 0.0, 33, 1))
    assert len(u) == 33 and common_prefix(u, v) < 16
    with pytest.raises(ValueError, match="block-tokens"):
        PromptBuilder(block_tokens=0)
    with pytest.raises(ValueError, match="input_len"):
        pb.prompt(BenchRequest(0, 0.0, 0, 1))


def test_prompt_text_pinned() -> None:
    """The block text is a fixed function of (seed, id): runs on any machine send the same bytes."""
    pb = PromptBuilder(block_tokens=512, seed=0)
    blk = pb.block(0)
    assert len(blk) == 512 and set(blk) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert blk.startswith("jtw   k cjtp i fjpdcv  pruxlpf ijgsvyqrlq")
    assert hashlib.sha256(blk.encode()).hexdigest()[:16] == "41804cfd5c20ba92"
