"""`prfaas profile` on the CPU with the tiny preset: the file it writes loads as a HardwareProfile."""

import json

import pytest

from prfaas.cli import main
from prfaas.scheduling.profile import load_profiles

ARGS = ["profile", "--model", "tiny", "--device", "cpu", "--batches", "1", "2"]
ARGS += ["--ctx", "16", "--steps", "2"]


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_profile_file_loads_with_load_profiles(tmp_path, suffix):
    out = tmp_path / f"tiny.{suffix}"
    assert main([*ARGS, "--lengths", "64", "32", "--name", "tiny-here", "--out", str(out)]) == 0
    profs = load_profiles(out)
    assert list(profs) == ["tiny-here"]
    p = profs["tiny-here"]
    assert p.lengths == (32, 64) and p.gpus_per_instance == 1
    # tiny, fp32: 2 MLA layers x (32 + 8) values x 4 B per token; 6 KDA layers x (2 heads x 32 x 32
    # x 4 B recurrent + 3 x 64 channels x 3 taps x 4 B conv) fixed
    fixed = 6 * (2 * 32 * 32 * 4 + 3 * 64 * 3 * 4)
    assert p.kv_bytes == (fixed + 320 * 32, fixed + 320 * 64) == (73216, 83456)
    assert all(t > 0 for t in p.prefill_s)
    assert p.decode_batch == (1, 2) and all(t > 0 for t in p.decode_step_s)
    assert p.decode_step_time(2) == pytest.approx(p.decode_step_s[1])
    assert p.s_kv(48) == pytest.approx(fixed + 320 * 48)
    if suffix == "json":
        meta = json.loads(out.read_text())["meta"]
        assert meta["device"] == "cpu" and meta["decode_ctx"] == 16


@pytest.mark.parametrize(
    "args, words",
    [
        ([*ARGS, "--lengths", "64"], "at least 2 distinct lengths"),
        ([*ARGS, "--lengths", "32", "64", "--gpus-per-instance", "0"], "--gpus-per-instance"),
        (
            ["profile", "--model", "nope", "--lengths", "8", "16", "--device", "cpu"],
            "unknown model",
        ),
        ([*ARGS, "--lengths", "32", "64", "--device", "gpu"], "device must be"),
    ],
)
def test_profile_bad_arguments_one_line_exit_2(capsys, args, words):
    # refused before anything loads: one line on stderr, exit status 2
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1, err
    assert err.startswith("prfaas profile: error:")


def test_profile_help():
    with pytest.raises(SystemExit) as e:
        main(["profile", "--help"])
    assert e.value.code == 0
