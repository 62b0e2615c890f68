"""HardwareProfile: interpolation, decode capacity, (de)serialisation."""

import json

import numpy as np
import pytest

from prfaas.scheduling.profile import MIB, HardwareProfile, gbps, load_profiles

LENGTHS = (1024, 8192, 32768, 131072)
KV_MIB = (190.8, 308.9, 701.3, 2316.3)
PREFILL = (0.44, 0.72, 1.84, 7.40)


def h200(interp: str = "loglog_pchip", **kw) -> HardwareProfile:
    return HardwareProfile(
        name="h200-8x",
        gpus_per_instance=8,
        lengths=LENGTHS,
        kv_bytes=tuple(v * MIB for v in KV_MIB),
        prefill_s=PREFILL,
        interp=interp,
        **kw,
    )


@pytest.mark.parametrize("interp", ["loglog_pchip", "linear"])
def test_exact_at_profiled_points(interp):
    p = h200(interp)
    for n, kv, t in zip(LENGTHS, KV_MIB, PREFILL, strict=True):
        assert p.s_kv(n) == pytest.approx(kv * MIB, rel=1e-12)
        assert p.t_prefill(n) == pytest.approx(t, rel=1e-12)


def test_phi_kv_matches_table5():
    # Table 5 Φ_kv column (Gbps); the 1K row is 3.61 in the paper but 190.8 MiB / 0.44 s = 3.64
    p = h200()
    got = [gbps(p.phi_kv(n)) for n in LENGTHS]
    assert got == pytest.approx([3.638, 3.599, 3.197, 2.626], abs=1e-3)
    assert got[1:] == pytest.approx([3.59, 3.19, 2.62], abs=0.011)


def test_s_kv_affine_extrapolation():
    p = h200()
    slope = (308.9 - 190.8) * MIB / (8192 - 1024)
    assert p.s_kv(128) == pytest.approx(190.8 * MIB - 896 * slope)
    hi_slope = (2316.3 - 701.3) * MIB / (131072 - 32768)
    assert p.s_kv(200_000) == pytest.approx(2316.3 * MIB + (200_000 - 131072) * hi_slope)
    arr = p.s_kv(np.array([1024, 8192]))
    assert isinstance(arr, np.ndarray) and arr.shape == (2,)
    assert isinstance(p.s_kv(5000), float)


@pytest.mark.parametrize("interp", ["loglog_pchip", "linear", "quadratic"])
def test_t_prefill_monotone_and_continuous(interp):
    p = h200(interp)
    x = np.geomspace(64, 400_000, 2000)
    y = p.t_prefill(x)
    assert np.all(np.diff(y) > 0)
    for edge in (1024, 131072):
        assert p.t_prefill(edge * (1 - 1e-9)) == pytest.approx(
            p.t_prefill(edge * (1 + 1e-9)), rel=1e-6
        )


def test_loglog_extrapolation_is_end_power_law():
    p = h200()
    k = np.log(7.40 / 1.84) / np.log(4)
    assert p.t_prefill(262144) == pytest.approx(7.40 * 2**k)
    k0 = np.log(0.72 / 0.44) / np.log(8)
    assert p.t_prefill(128) == pytest.approx(0.44 * (1 / 8) ** k0)


def test_linear_interp_midpoint():
    p = h200("linear")
    assert p.t_prefill((8192 + 32768) / 2) == pytest.approx((0.72 + 1.84) / 2)


def test_decode_rate_and_step_time():
    p = h200(bs_max=20, t_decode_s=0.025)
    assert p.decode_rate(1024) == pytest.approx(0.78125)
    assert p.decode_step_time(1) == 0.025
    assert p.decode_step_time(20) == 0.025
    assert p.decode_step_time(40) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="output_len"):
        p.decode_rate(0)
    with pytest.raises(ValueError, match="decode capacity"):
        h200().decode_rate(1024)
    with pytest.raises(ValueError, match="batch"):
        p.decode_step_time(0)


def test_decode_table_and_slo():
    p = h200(decode_batch=(1, 8, 16, 32), decode_step_s=(0.010, 0.014, 0.020, 0.032))
    assert p.decode_step_time(12) == pytest.approx(0.017)
    assert p.decode_step_time(48) == pytest.approx(0.044)
    q = p.with_decode_slo(0.025)
    assert (q.bs_max, q.t_decode_s) == (16, 0.020)
    assert q.decode_rate(1000) == pytest.approx(16 / 0.020 / 1000)
    with pytest.raises(ValueError, match="meets TPOT"):
        p.with_decode_slo(0.005)


def test_round_trip_and_mib(tmp_path):
    p = h200(bs_max=20, t_decode_s=0.025, gpu_price_per_hour=3.5)
    assert HardwareProfile.from_dict(p.to_dict()) == p
    json.dumps(p.to_dict())
    d = p.to_dict()
    d.pop("kv_bytes")
    d["kv_mib"] = list(KV_MIB)
    assert HardwareProfile.from_dict(d) == p
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps({"profiles": {"a": {k: v for k, v in p.to_dict().items() if k != "name"}}})
    )
    loaded = load_profiles(f)
    assert loaded["a"].name == "a" and loaded["a"].t_prefill(8192) == 0.72
    y = tmp_path / "p.yaml"
    y.write_text(
        "h20:\n  gpus_per_instance: 8\n  lengths: [1024, 8192]\n  kv_mib: [1, 2]\n"
        "  prefill_s: [1.0, 2.0]\n  decode_batch: [1, 20, 40]\n  decode_step_s: [0.01, 0.025, 0.04]\n"
        "  tpot_slo_s: 0.025\n"
    )
    h20 = load_profiles(y)["h20"]
    assert (h20.bs_max, h20.t_decode_s, h20.s_kv(1024)) == (20, 0.025, MIB)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(lengths=(1024,), kv_bytes=(1.0,), prefill_s=(1.0,)), "at least 2"),
        (dict(lengths=(1024, 8192, 8192, 131072)), "strictly increasing"),
        (dict(prefill_s=(0.44, 0.72, 1.84)), "equal sizes"),
        (dict(prefill_s=(0.44, 0.0, 1.84, 7.4)), "positive"),
        (dict(interp="spline"), "interp"),
        (dict(bs_max=0), "bs_max"),
        (dict(gpus_per_instance=0), "gpus_per_instance"),
    ],
)
def test_bad_profiles(kw, msg):
    base = h200().to_dict()
    base.update(kw)
    with pytest.raises(ValueError, match=msg):
        HardwareProfile.from_dict(base)


def test_bad_inputs(tmp_path):
    p = h200()
    with pytest.raises(ValueError, match="positive"):
        p.t_prefill(0)
    with pytest.raises(ValueError, match=">= 0"):
        p.s_kv(-1)
    with pytest.raises(ValueError, match="unknown profile keys"):
        HardwareProfile.from_dict({**p.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="misses keys"):
        HardwareProfile.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="no such config"):
        load_profiles(tmp_path / "nope.yaml")
