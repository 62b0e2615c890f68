"""Issue-level test of the KV hand-off: a prefill-role engine in this process streams each request's
cache layer by layer to a decode-role engine in a second OS process, on both transfer backends; the
tokens equal those of one mixed engine, and only the uncached tail crosses."""

from __future__ import annotations

import multiprocessing as mp
import queue
import random

import pytest

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.kv.streaming import LayerStreamer
from prfaas.model.checkpoint import build_model
from prfaas.server.node.kv_layout import layout_for_engine
from prfaas.transfer.backend import Delivery
from prfaas.transfer.registry import create_sender

SECRET = "handoff-test-secret"


def _decode_node(backend: str, jobs: mp.Queue, results: mp.Queue) -> None:
    """Second process: a decode-role engine behind a KV receiver."""
    from prfaas.transfer.registry import create_receiver

    eng = LLMEngine(EngineConfig(model="tiny", role="decode"))
    rx = create_receiver(backend, layout_for_engine(eng), SECRET, host="127.0.0.1", port=0).start()
    results.put(("address", rx.address))
    while True:
        job = jobs.get(timeout=120)
        if job[0] == "stop":
            break
        if job[0] == "match":  # how much of a prompt this node holds in its prefix cache
            results.put(("match", eng.cache.match(job[1], need_state=False).num_tokens))
            continue
        d = rx.deliveries.get(timeout=60)  # job == ("decode",)
        if not isinstance(d, Delivery):
            results.put(("error", repr(d.error)))
            continue
        h = d.export.header
        eng.import_request(d.export, SamplingParams(**h.meta["params"]))
        done = None
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done = o
        results.put(("done", h.request_id, done.token_ids, d.timings.payload_bytes))
    rx.close()


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


@pytest.mark.parametrize("backend", ["tcp", "mooncake"])
def test_two_process_handoff_equals_mixed(backend):
    model = build_model("tiny")
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_decode_node, args=(backend, jobs, results), daemon=True)
    proc.start()
    try:
        kind, peer = results.get(timeout=120)
        assert kind == "address"
        pre = LLMEngine(
            EngineConfig(model="tiny", role="prefill", max_num_batched_tokens=48), model=model
        )
        sender = create_sender(backend, layout_for_engine(pre), SECRET, connections=2)
        streamer = LayerStreamer(pre, sender)
        mixed = LLMEngine(EngineConfig(model="tiny"), model=model)
        cfg = model.config
        kda_bytes = cfg.kda_state_bytes(conv_dtype_bytes=4)
        mla_per_token = cfg.mla_bytes_per_token(dtype_bytes=4)
        shared = _prompt(1, 160)
        cases = [  # (prompt, sampling): no prefix on the decode node, then a prefix hit
            (shared + _prompt(2, 30), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
            (
                shared + _prompt(3, 45),
                SamplingParams(temperature=0.9, seed=7, max_tokens=8, ignore_eos=True),
            ),
        ]
        for i, (prompt, sp) in enumerate(cases):
            jobs.put(("match", prompt))
            kind, held = results.get(timeout=60)
            assert held == (0 if i == 0 else 160)  # the first request left 160 tokens of blocks
            rid = pre.add_request(prompt, sp, f"r{i}", kv_start=held)
            streamer.expect(rid, peer)
            prefilled = False
            while not prefilled:
                prefilled = any(o.finish_reason == "prefilled" for o in pre.step())
            st = streamer.handoff(rid)
            stats = st.stream.wait(30)
            assert st.layers_sent == cfg.num_hidden_layers and not st.whole  # streamed in step()
            jobs.put(("decode",))
            kind, got_rid, tokens, payload = results.get(timeout=120)
            assert (kind, got_rid) == ("done", rid)
            want = mixed.add_request(prompt, sp)
            ref = None
            while mixed.has_unfinished():
                for o in mixed.step():
                    if o.request_id == want and o.finished:
                        ref = o
            assert tokens == ref.token_ids
            # only the uncached tail crosses: [held, L - 1) of the MLA KV + the fixed KDA state
            assert payload == kda_bytes + (len(prompt) - 1 - held) * mla_per_token
            assert stats.payload_bytes == payload
        assert pre.cache.blocks.num_in_use() == 0 and not pre.prefilled
        sender.close()
    finally:
        jobs.put(("stop",))
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    with pytest.raises(queue.Empty):
        results.get(timeout=0.1)
