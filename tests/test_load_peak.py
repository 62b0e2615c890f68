"""``benchmarks/load_peak.py`` (peak host memory during a full-size load, issue 14 point 2) and
its modules (host_memory, shard_placement, synth_checkpoint), in its CPU dry run (tiny model, two
directories): the shards spread over both, the loader's weights equal the writer's (digests,
bit-equal logits, greedy tokens), a flipped byte is caught, a checkpoint that cannot fit fails
before writing, everything written is deleted; and its parts: the status sampler sees an
allocation, the safetensors writer's files read back, the release config and tensor list of the
48B geometry."""

from __future__ import annotations

import json
import math
import mmap
import os

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import host_memory as hm
from benchmarks import load_peak as lp
from benchmarks import shard_placement as sp
from benchmarks import synth_checkpoint as sc
from prfaas.model.config import PRESETS, ModelConfig


def _dry(tmp_path, *extra: str, dirs: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    argv = ["--model", "tiny", "--device", "cpu", "--shard-gb", "0.001", "--tag", "cpu"]
    argv += ["--dirs", *dirs, str(tmp_path / "a") + "=0.002", str(tmp_path / "b")]
    argv += ["--out", str(tmp_path / "res"), "--budget-s", "300", "--gen-tokens", "2", *extra]
    rc = lp.main(argv)
    res = json.loads((tmp_path / "res" / "load_peak_cpu.json").read_text())
    md = (tmp_path / "res" / "load_peak_cpu.md").read_text()
    return rc, res, md


def test_sampler_sees_an_allocation_and_its_release():
    s = hm.StatusSampler(0.01).start()
    try:
        hm.reset_hwm()
        base = s.reset()
        # a fresh anonymous mapping, every page touched (a heap allocation could reuse memory
        # that earlier tests left resident), then unmapped
        a = mmap.mmap(-1, 256 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, 256 << 20, 4096):
            a[off] = 1
        mid = s.peaks()
        a.close()
        after = hm.read_status()
        peak = s.peaks()
    finally:
        s.stop()
    assert mid["RssAnon"] - base["RssAnon"] > 200 << 20
    assert peak["RssAnon"] >= mid["RssAnon"] > after["RssAnon"] + (200 << 20)
    assert peak["VmRSS"] >= peak["RssAnon"] and s.samples >= 2


def test_dry_run_loads_what_was_written_and_cleans_up(tmp_path, monkeypatch, capsys):
    # a tmpfs entry first that cannot be mounted (not root): planned without it
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    m = f"tmpfs:{tmp_path / 'm'}"
    # the writer through its two rotating buffers (as on a GPU) of 10,485 bytes: tensors packed
    # and split at odd byte offsets
    # two further loads reading 3 x 4 KiB and 1 x 1 KiB at a time
    rc, res, md = _dry(
        tmp_path,
        *("--host-mem-gib", "1000", "--staged-write", "--chunk-mb", "0.01"),
        *("--read-configs", "2x0.5", "3x0.004", "1x0.001"),
        dirs=(m,),
    )
    assert "needs root to mount a tmpfs: planning without it" in capsys.readouterr().out
    assert rc == 0 and res["status"] == "ok", res.get("error")
    pl, ld = res["plan"], res["load"]
    assert pl["tensors"] == 325 and pl["shards"] >= 4
    placed = {t["path"]: t["placed"] for t in pl["targets"]}
    assert placed.pop(str(tmp_path / "m")) == 0 and not (tmp_path / "m").exists()
    assert 0 < placed[str(tmp_path / "a")] <= 0.002e9 and placed[str(tmp_path / "b")] > 0
    assert sum(placed.values()) == pl["bytes"]
    # the check: every tensor's bytes, the prompt's logits bit for bit, the greedy tokens
    assert ld["digests_equal"] == ld["digests_total"] == 325 and not ld["digest_mismatches"]
    assert ld["reference_deterministic"] and ld["logits_bit_equal"]
    assert ld["tokens_equal"] and len(ld["greedy_tokens"]) == 2
    # the peaks: the CPU model stays resident, so the load's growth holds at least its bytes
    assert ld["samples"] >= 2 and ld["load_s"] > 0
    for k in hm.STATUS_KEYS:
        assert ld["peak"][k] >= ld["baseline"][k] and ld["peak_over_baseline"][k] >= 0
    assert ld["peak_over_baseline"]["RssAnon"] >= pl["bytes"]
    assert ld["peak"]["VmRSS"] >= ld["peak"]["RssAnon"]
    assert pl["largest_tensor"] == "model.embed_tokens.weight"
    assert pl["largest_tensor_bytes"] == 384 * 128 * 2
    # deleted, directories too; the report says what ran
    assert res["cleanup"]["files_deleted"] >= pl["shards"]
    assert res["cleanup"]["shard_bytes_deleted"] >= pl["bytes"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert "Status: **ok**" in md and "--model tiny" in md and "325/325" in md
    assert ld["read_config"] == {"read_depth": 2, "chunk_mb": 0.5}
    sw = res["sweep"]
    assert [s["read_config"]["read_depth"] for s in sw] == [3, 1]
    assert all(s["digests_equal"] == 325 and s["tokens_equal"] is None for s in sw)
    assert "| 3 x 0.004 |" in md and "| 1 x 0.001 |" in md


def test_dry_run_catches_a_flipped_byte(tmp_path):
    rc, res, md = _dry(tmp_path, "--corrupt", "model.norm.weight")
    assert rc == 1 and res["status"] == "mismatch"
    ld = res["load"]
    assert ld["digest_mismatches"] == ["model.norm.weight"] and ld["digests_equal"] == 324
    assert ld["logits_bit_equal"] is False and ld["logits_max_abs_diff"] > 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert "Status: **mismatch**" in md


def test_a_loader_failure_is_reported_and_cleaned_up(tmp_path):
    rc, res, md = _dry(tmp_path, "--corrupt", "truncate:model.norm.weight")
    assert rc == 2 and res["status"] == "failed" and "load" not in res
    assert "the loader failed" in res["error"] and "truncated" in res["error"]
    assert res["write"]["write_s"] >= 0 and res["cleanup"]["files_deleted"] >= 5
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert "Status: **failed**" in md


def test_a_checkpoint_that_does_not_fit_fails_before_writing(tmp_path):
    argv = ["--model", "tiny", "--device", "cpu", "--shard-gb", "0.001", "--tag", "cpu"]
    argv += ["--dirs", str(tmp_path / "a") + "=0.001", str(tmp_path / "b") + "=0.001"]
    rc = lp.main(argv + ["--out", str(tmp_path / "res")])
    res = json.loads((tmp_path / "res" / "load_peak_cpu.json").read_text())
    assert rc == 2 and res["status"] == "failed" and "does not fit" in res["error"]
    assert "write" not in res and not (tmp_path / "a").exists()


def test_placement_first_fit_shares_a_filesystem_and_caps(tmp_path):
    shards = [{"file": f"s{i}", "nbytes": 10} for i in range(5)]
    t = [sp.Target(tmp_path / "x", cap=25), sp.parse_target(str(tmp_path / "y"))]
    assert sp.parse_target(f"{tmp_path / 'x'}=2.5").cap == int(2.5e9)
    sp.place(shards, t, host_mem=1 << 40, mem_reserve=0, disk_reserve=0)
    assert [s["target"] for s in shards] == [str(tmp_path / "x")] * 2 + [str(tmp_path / "y")] * 3
    # one filesystem's free space is shared by its entries
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    big = [{"file": f"s{i}", "nbytes": int(free * 0.4)} for i in range(3)]
    t = [sp.parse_target(str(tmp_path / "x")), sp.parse_target(str(tmp_path / "y"))]
    with pytest.raises(sp.PlanError, match="does not fit"):
        sp.place(big, t, host_mem=1 << 40, mem_reserve=0, disk_reserve=0)
    mt = sp.parse_target("tmpfs:/mnt/nowhere")
    assert mt.mount and mt.memory_backed and mt.path.as_posix() == "/mnt/nowhere"


def test_safetensors_writer_reads_back(tmp_path):
    ts = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.randn(7),
        "c": torch.randn(1, 1, 2, 1),
    }
    entries = [
        {
            "name": k,
            "shape": list(v.shape),
            "dtype": "BF16" if v.dtype == torch.bfloat16 else "F32",
            "nbytes": v.numel() * v.element_size(),
        }
        for k, v in ts.items()
    ]
    head, offs = sc.safetensors_header(entries)
    assert len(head) % 8 == 0 and offs == [0, 30, 58]
    fd = os.open(tmp_path / "f.safetensors", os.O_WRONLY | os.O_CREAT)
    sc.write_all(fd, head)
    for v in ts.values():
        sc.write_all(fd, v.reshape(-1).view(torch.uint8).numpy())
    os.close(fd)
    back = load_file(str(tmp_path / "f.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    d = sc.digests(ts, list(ts))
    d2 = sc.digests({**ts, "b": ts["b"].flip(0)}, ["b"])
    assert d["b"][0] == d2["b"][0] and d["b"][1] != d2["b"][1]  # same bytes, moved: caught


def test_release_config_and_tensors_of_the_48b_geometry():
    cfg = PRESETS["kimi-linear-48b"]
    d = sc.release_config(cfg)
    assert ModelConfig.from_hf_dict(d).fingerprint() == cfg.fingerprint()
    assert d["model_max_length"] == 1048576 and "mlp_layer_types" not in d
    assert d["linear_attn_config"]["full_attn_layers"] == [4, 8, 12, 16, 20, 24, 27]
    assert d["num_key_value_heads"] == 32 and d["torch_dtype"] == "bfloat16"
    specs = sc.tensor_specs(cfg)
    assert len(specs) == 20493
    assert sum(math.prod(s["shape"]) for s in specs) == 49_122_681_728
    fp32 = {
        s["name"].rsplit(".", 2)[-2] + "." + s["name"].rsplit(".", 1)[-1]
        for s in specs
        if s["dtype"] == "F32"
    }
    assert fp32 == {
        "gate.weight",
        "gate.e_score_correction_bias",
        "self_attn.A_log",
        "self_attn.dt_bias",
    }
    assert "model.layers.26.block_sparse_moe.experts.255.w2.weight" in {s["name"] for s in specs}
    shards = sc.plan_shards(specs, int(5e9))
    assert len(shards) == 20 and max(s["nbytes"] for s in shards) <= 5e9
    assert sum(s["nbytes"] for s in shards) == sum(s["nbytes"] for s in specs) > 98e9


@pytest.mark.parametrize("chunk", [7, 1000, 4096])
def test_staged_writer_keeps_the_byte_order(tmp_path, chunk):
    g = torch.Generator().manual_seed(0)
    srcs = [
        torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        for n in (1, 999, 1000, 2500, 3, 0, 4096)
    ]
    slots = [torch.empty(chunk, dtype=torch.uint8) for _ in range(2)]
    seen = []
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    n = sc.write_staged(fd, srcs, slots, None, seen.append)
    os.close(fd)
    want = b"".join(t.numpy().tobytes() for t in srcs)
    assert (tmp_path / "f").read_bytes() == want and n == len(want)
    assert seen == [chunk] * (len(want) // chunk)
