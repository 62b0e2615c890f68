"""Length distributions and trace prefix matching."""

import json

import numpy as np
import pytest
from scipy import integrate

from prfaas.scheduling.lengths import Empirical, TruncatedLogNormal, read_trace, uncached_lengths

TRACE = "../shared/traces/mooncake_synthetic_trace.jsonl"


def paper_dist() -> TruncatedLogNormal:
    return TruncatedLogNormal(9.90, 1.00, 128, 131072)


def _pdf(d, x):
    return np.exp(-((np.log(x) - d.mu) ** 2) / (2 * d.sigma**2)) / (
        x * d.sigma * np.sqrt(2 * np.pi)
    )


def test_lognormal_moments_match_quadrature():
    d = paper_dist()
    lx = lambda f, a, b: integrate.quad(f, np.log(a), np.log(b), limit=200)[0]  # noqa: E731
    z = lx(lambda u: _pdf(d, np.exp(u)) * np.exp(u), 128, 131072)
    m = lx(lambda u: _pdf(d, np.exp(u)) * np.exp(2 * u), 128, 131072) / z
    assert d.mean() == pytest.approx(m, rel=1e-9)
    t = 19400
    pa = lx(lambda u: _pdf(d, np.exp(u)) * np.exp(u), t, 131072) / z
    ma = lx(lambda u: _pdf(d, np.exp(u)) * np.exp(2 * u), t, 131072) / z / pa
    mb = lx(lambda u: _pdf(d, np.exp(u)) * np.exp(2 * u), 128, t) / z / (1 - pa)
    assert d.prob_above(t) == pytest.approx(pa, rel=1e-9)
    assert d.mean_above(t) == pytest.approx(ma, rel=1e-9)
    assert d.mean_below(t) == pytest.approx(mb, rel=1e-9)


def test_paper_workload_figures():
    d = paper_dist()
    assert d.mean() == pytest.approx(27486, abs=1)  # paper: "mean ≈ 27K"
    assert d.prob_above(19400) == pytest.approx(0.496, abs=0.001)  # paper: 49.6% offloaded
    assert d.mean_above(19400) == pytest.approx(45046, abs=1)  # paper: "≈ 44K"
    p = d.prob_above(19400)
    assert p * d.mean_above(19400) + (1 - p) * d.mean_below(19400) == pytest.approx(d.mean())


def test_lognormal_edges_and_sampling():
    d = paper_dist()
    assert d.prob_above(100) == 1.0 and d.prob_above(131072) == 0.0
    assert d.mean_above(131072) == 131072 and d.mean_below(128) == 128
    assert d.mean_below(1e9) == pytest.approx(d.mean())
    s = d.sample(200_000, 1)
    assert s.min() >= 128 and s.max() <= 131072
    assert s.mean() == pytest.approx(d.mean(), rel=0.01)
    assert np.mean(s > 19400) == pytest.approx(d.prob_above(19400), abs=0.005)
    assert np.array_equal(d.sample(10, 7), d.sample(10, np.random.default_rng(7)))
    assert d.quantile(0.5) == pytest.approx(np.median(s), rel=0.02)


@pytest.mark.parametrize(
    "args, msg", [((9.9, 0, 128, 1e5), "sigma"), ((9.9, 1, 0, 1e5), "lo"), ((9.9, 1, 10, 5), "lo")]
)
def test_lognormal_bad(args, msg):
    with pytest.raises(ValueError, match=msg):
        TruncatedLogNormal(*args)


def test_empirical_exact():
    e = Empirical([10, 20, 30, 40])
    assert e.mean() == 25
    assert e.prob_above(20) == 0.5
    assert e.mean_above(20) == 35 and e.mean_below(20) == 15
    assert e.mean_above(40) == 40 and e.mean_below(5) == 10
    assert set(e.sample(50, 0)) <= {10, 20, 30, 40}
    with pytest.raises(ValueError, match="non-empty"):
        Empirical([])
    with pytest.raises(ValueError, match=">= 0"):
        Empirical([1, -2])


def test_uncached_lengths_prefix_matching():
    recs = [
        {"input_length": 1500, "hash_ids": [1, 2, 3]},  # nothing cached
        {"input_length": 1200, "hash_ids": [1, 2, 9]},  # shares 2 full blocks
        {"input_length": 1024, "hash_ids": [1, 2]},  # whole prompt cached -> 1 token left
        {"input_length": 700, "hash_ids": [5, 2]},  # first block differs -> no reuse
        {"input_length": 2000, "hash_ids": [1, 2, 3, 4]},  # only full blocks were cached: 2
    ]
    assert uncached_lengths(recs).tolist() == [1500, 176, 1, 700, 976]
    assert uncached_lengths(recs, prefix_cache=False).tolist() == [1500, 1200, 1024, 700, 2000]
    with pytest.raises(ValueError, match="input_length"):
        uncached_lengths([{"hash_ids": []}])


def test_trace_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    f = tmp_path / "t.jsonl"
    recs = []
    for i in range(50):
        n = int(rng.integers(1, 5000))
        shared = [0] if i % 2 else []
        ids = shared + [1000 + i * 100 + j for j in range((n + 511) // 512 - len(shared))]
        recs.append({"timestamp": i, "input_length": n, "output_length": 8, "hash_ids": ids})
    f.write_text("\n".join(json.dumps(r) for r in recs))
    assert read_trace(f) == recs
    e = Empirical.from_trace(f)
    assert e.samples.size == 50
    assert e.mean() == pytest.approx(np.mean(uncached_lengths(recs)))
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match="bad JSON"):
        read_trace(tmp_path / "bad.jsonl")


def test_shared_trace_if_present():
    import os

    if not os.path.exists(TRACE):
        pytest.skip("shared trace not present")
    raw = Empirical.from_trace(TRACE, prefix_cache=False)
    assert raw.samples.size == 3993
    assert raw.mean() == pytest.approx(15325.5, abs=0.1)  # README: mean input 15.3K
    assert Empirical.from_trace(TRACE).mean() < raw.mean()
