"""The live prefill node sends a request's KV layer by layer during its last prefill chunk (the
stream opens before the prefill ends), the decode node imports it, and the tokens equal those of
the same node sending the whole export after the prefill; the decode node writes each layer into
its engine's cache as it lands. Nodes run in process (no HTTP)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.server.config import parse_deploy_config
from prfaas.server.node.server import NodeServer
from prfaas.server.protocol import DecodeRequest, DecodeTarget, PrefillRequest, SamplingParamsMsg

CFG = {
    "model": "tiny",
    "secret": "layerwise-secret-0123456789",
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "f0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [{"name": "p0", "role": "prefill"}, {"name": "d0", "role": "decode"}],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0, "rtt_ms": 5}],
    "router": {"threshold": 256},
}


async def _one(f0: NodeServer, d0: NodeServer, rid: str, prompt: list[int]) -> tuple:
    params = SamplingParamsMsg(temperature=0.0, max_tokens=6, ignore_eos=True)
    exp, token_start = await d0.decode.open(
        DecodeRequest(request_id=rid, prompt_token_ids=prompt, params=params)
    )
    events: list[dict] = []

    async def consume() -> None:
        async for line in d0.decode.stream(exp, token_start):
            events.append(json.loads(line))

    task = asyncio.create_task(consume())
    res = await f0.prefill.prefill(
        PrefillRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            token_start=token_start,
            params=params,
            decode=DecodeTarget(cluster="pd", kv_host=d0.node.host, kv_port=d0.kv_port),
            timeout_s=120.0,
        )
    )
    await asyncio.wait_for(task, 120)
    tokens = [t for e in events if e["event"] == "token" for t in e["token_ids"]]
    kv = [e for e in events if e["event"] == "kv"]
    return res, tokens, kv


@pytest.mark.parametrize("layerwise", [True, False])
def test_live_prefill_streams_layers_and_tokens_match(tiny_model, layerwise: bool) -> None:
    cfg = parse_deploy_config(CFG)
    nodes = {
        n: NodeServer(cfg, n, engine=LLMEngine(cfg.node_engine_config(n), model=tiny_model))
        for n in ("f0", "d0")
    }
    f0, d0 = nodes["f0"], nodes["d0"]
    assert f0.prefill.streamer is not None and d0.prefill.streamer is None
    if not layerwise:  # the whole export after the prefill, as before
        f0.prefill.streamer = None
        f0.engine.layer_listener = None
    rng = random.Random(7)
    prompt = [rng.randrange(1, 200) for _ in range(300)]
    for n in nodes.values():
        n.start()
    try:
        res, tokens, kv = asyncio.run(_one(f0, d0, "lw", prompt))
    finally:
        for n in nodes.values():
            n.close()
    t = res.timings
    assert len(kv) == 1 and kv[0]["payload_bytes"] == res.payload_bytes > 0
    # the decode node wrote every layer into the engine's cache as it landed, before the
    # delivery (both ways: the receiver hands each verified layer out)
    kt = kv[0]["timings"]
    n_layers = d0.engine.model_config.num_hidden_layers
    assert kt["layers_written_early"] == n_layers
    assert kt["layers_written_at"] <= kt["import_end"]
    assert res.link == "prfaas->pd"
    if layerwise:  # opened by the first layer of the last chunk, inside the prefill's last step
        assert t["send_opened"] <= t["prefill_end"]
    else:
        assert t["send_opened"] >= t["prefill_end"]
    # the same tokens as a mixed engine computing the whole prompt itself
    mixed = LLMEngine(EngineConfig(model="tiny"), model=tiny_model)
    want = mixed.add_request(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    ref = None
    while mixed.has_unfinished():
        for o in mixed.step():
            if o.request_id == want and o.finished:
                ref = o
    assert ref is not None and tokens == ref.token_ids
