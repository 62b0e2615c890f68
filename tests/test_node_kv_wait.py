"""The decode node on the engine's waiting-for-KV state, in process: opened decodes wait in the
engine (``expect_kv``), deliveries go to ``import_kv`` and wait for a slot there (one slot, three
requests), each receive buffer is released exactly once (also for a request aborted while its KV
waited), and the tokens equal those of one mixed engine."""

from __future__ import annotations

import asyncio
import time

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.server.config import parse_deploy_config
from prfaas.server.protocol import DecodeRequest, ErrorEvent, KVEvent, TokenEvent
from prfaas.transfer.backend import Delivery, TransferTimings

CFG = {
    "model": "tiny",
    "secret": "unit-secret-0123456789",
    "engine": {"max_num_seqs": 1},
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "f0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [{"name": "p0", "role": "prefill"}, {"name": "d0", "role": "decode"}],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0}],
}


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 250 for i in range(n)]


def test_decode_node_waits_in_the_engine_and_releases_every_buffer(tiny_model):
    from prfaas.server.node.server import NodeServer

    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ps = {f"r{i}": prompt(i, 30 + 9 * i) for i in range(4)}
    mixed = LLMEngine(EngineConfig(model="tiny"), model=tiny_model)
    for rid, p in ps.items():
        mixed.add_request(p, sp, rid)
    want = {}
    while mixed.has_unfinished():
        want.update({o.request_id: o.token_ids for o in mixed.step() if o.finished})
    pre = LLMEngine(EngineConfig(model="tiny", role="prefill"), model=tiny_model)
    for rid, p in ps.items():
        pre.add_request(p, sp, rid)
    while pre.has_unfinished():
        pre.step()
    exports = {rid: pre.export_request(rid) for rid in ps}

    cfg = parse_deploy_config(CFG)
    node = NodeServer(cfg, "d0", engine=LLMEngine(cfg.node_engine_config("d0"), model=tiny_model))
    node.worker.start()  # no receiver: deliveries are handed in below
    released: list[str] = []

    def delivery(rid: str) -> Delivery:
        now = time.time()
        t = TransferTimings(rid, now, now, now, now, 1, 1)
        return Delivery(exports[rid], t, release_fn=lambda: released.append(rid))

    async def main() -> dict:
        dec = node.decode
        streams = {}
        for rid, p in ps.items():
            req = DecodeRequest(request_id=rid, prompt_token_ids=p, params=sp.__dict__)
            exp, token_start = await dec.open(req)
            assert token_start == 0
            streams[rid] = exp
        st = node.state()
        assert (st.expecting, st.running) == (4, 0)
        for rid in ps:
            dec._on_delivery(delivery(rid))
        # one slot: r0 decodes while r1..r3 wait in the engine with their KV; abort r3 there
        while node.engine.stats().kv_arrived < 3:
            await asyncio.sleep(0.01)
        assert dec.abort("r3")
        events: dict[str, list] = {rid: [] for rid in ps}
        for rid, exp in streams.items():
            while True:
                ev = await asyncio.wait_for(exp.queue.get(), 120)
                events[rid].append(ev)
                if isinstance(ev, ErrorEvent) or (isinstance(ev, TokenEvent) and ev.finished):
                    break
            if rid != "r3":
                dec.drop(exp)
        return events

    try:
        events = asyncio.run(main())
        for _ in range(500):  # the engine thread hands r3's buffer back at its next step
            if len(released) == 4:
                break
            time.sleep(0.01)
    finally:
        node.worker.stop()
    for rid in ("r0", "r1", "r2"):
        evs = events[rid]
        assert isinstance(evs[0], KVEvent)
        assert [t for e in evs[1:] for t in e.token_ids] == want[rid]
        assert evs[-1].finish_reason == "length"
    assert isinstance(events["r3"][0], ErrorEvent) and events["r3"][0].code == "aborted"
    assert sorted(released) == ["r0", "r1", "r2", "r3"]  # each buffer once
    assert node.counters.imports == 3
    st = node.engine.stats()
    assert (st.waiting_for_kv, st.running, st.kv_arrived) == (0, 0, 0)
    assert node.engine.cache.blocks.num_in_use() == 0


def test_a_kv_that_never_comes_ends_the_request_with_an_error(tiny_model):
    # the router bounds the wait (kv_timeout_s): a KV lost with a dead prefill node ends the
    # request with an error event and frees the engine, instead of holding the stream forever
    from prfaas.server.node.server import NodeServer

    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    cfg = parse_deploy_config(CFG)
    node = NodeServer(cfg, "d0", engine=LLMEngine(cfg.node_engine_config("d0"), model=tiny_model))
    node.worker.start()

    async def main() -> list:
        req = DecodeRequest(
            request_id="lost", prompt_token_ids=prompt(1, 40), params=sp.__dict__, kv_timeout_s=0.5
        )
        exp, _ = await node.decode.open(req)
        ev = await asyncio.wait_for(exp.queue.get(), 120)
        node.decode.drop(exp)
        return [ev]

    try:
        (ev,) = asyncio.run(main())
    finally:
        node.worker.stop()
    assert isinstance(ev, ErrorEvent) and ev.code == "request_failed", ev
    assert "KV" in ev.message, ev.message
    st = node.engine.stats()
    assert (st.waiting_for_kv, st.running) == (0, 0)
    assert node.engine.cache.blocks.num_in_use() == 0
