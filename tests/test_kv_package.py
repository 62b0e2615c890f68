"""Contracts of the kv/transfer split: one CacheLayout made by the cache, transfer never loads the
engine, the receiver hands each outcome out once, the link meter counts busy time."""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from prfaas.cache.hybrid import CacheConfig, HybridCache
from prfaas.kv.layout import CacheLayout
from prfaas.kv.synthetic import random_export
from prfaas.model.config import PRESETS
from prfaas.transfer.backend import Delivery, TransferFailure
from prfaas.transfer.link import LinkShaper
from prfaas.transfer.meter import LinkMeter
from prfaas.transfer.registry import create_receiver, create_sender

SECRET = "kv-package-secret-0123456789"


def test_cache_makes_its_layout() -> None:
    m = PRESETS["tiny"]
    cache = HybridCache(
        m, CacheConfig(block_size=16, num_blocks=8, max_seqs=2), dtype=torch.bfloat16
    )
    lay = cache.layout(4096)
    assert isinstance(lay, CacheLayout)
    assert lay.model_fingerprint == m.fingerprint()
    assert lay.layer_kinds == tuple(m.layer_kinds)
    assert lay.max_tokens == 4096
    for i, kind in enumerate(m.layer_kinds):
        specs = lay.layer_specs(i)
        if kind == "mla":
            assert specs["kv"].dtype == torch.bfloat16
            assert specs["kv"].resolve(10) == (10, m.latent_dim)
        else:
            assert specs["state"].dtype == torch.float32
            assert specs["state"].shape == (m.kda_num_heads, m.kda_head_dim, m.kda_head_dim)
            assert specs["conv"].shape == (3, m.kda_width, m.short_conv_kernel_size - 1)


def test_transfer_does_not_import_the_engine_or_server() -> None:
    code = (
        "import sys\n"
        "import prfaas.transfer.registry, prfaas.transfer.tcp, prfaas.transfer.mooncake_backend\n"
        "import prfaas.kv.streaming\n"
        "bad = [m for m in sys.modules if m.startswith(('prfaas.engine', 'prfaas.server'))]\n"
        "assert not bad, bad\n"
        "import prfaas.transfer.link\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    torch_free = (
        "import sys\nimport prfaas.transfer.link, prfaas.transfer\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", torch_free], check=True, timeout=120)


def test_receiver_hands_each_outcome_out_once() -> None:
    lay = CacheLayout.kimi_linear("fp-once", ["kda", "mla"], kda_heads=1, max_tokens=1024)
    got: list[object] = []
    rx = create_receiver("tcp", lay, SECRET, on_delivery=got.append, on_failure=got.append)
    rx.start()
    tx = create_sender("tcp", lay, SECRET, connections=2)
    try:
        ex = random_export(lay, "once", 0, 300)
        tx.send_export(rx.address, ex).wait(30)
        deadline = time.monotonic() + 30
        while not got:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert isinstance(got[0], Delivery) and got[0].export.header.request_id == "once"
        got[0].release()
        assert rx.deliveries.empty()  # callbacks given: nothing is queued as well
    finally:
        tx.close()
        rx.close()
    assert all(isinstance(x, Delivery | TransferFailure) for x in got)


def test_meter_counts_busy_time() -> None:
    m = LinkMeter(link=LinkShaper(gbps=1.0))
    assert m.snapshot().busy_s == 0.0
    m.add_queued(100)
    time.sleep(0.05)
    m.add_sent(100, was_queued=100)
    busy = m.snapshot().busy_s
    assert 0.04 <= busy < 5.0
    time.sleep(0.05)
    assert m.snapshot().busy_s == busy  # idle time is not busy time
