"""The gateway<->node messages: strict parsing, the decode stream's events, and the two torch-free
mirrors kept equal to the engine's types (sampling parameters on the wire, the engine limits the
gateway routes by)."""

from __future__ import annotations

import dataclasses

import pytest

from prfaas.engine import EngineConfig, SamplingParams
from prfaas.server.config import EngineLimits, parse_deploy_config
from prfaas.server.node.wire import engine_params, params_msg
from prfaas.server.protocol import (
    CacheEventsReply,
    DecodeRequest,
    ErrorEvent,
    KVEvent,
    NodeState,
    PrefillRequest,
    PrefixRequest,
    ReadyEvent,
    SamplingParamsMsg,
    TokenEvent,
    error_message,
    event_line,
    parse_decode_event,
)

PREFILL = (
    b'{"request_id": "r1", "prompt_token_ids": [1, 2, 3], "token_start": 0,'
    b' "params": {"temperature": 0, "max_tokens": 4}, "timeout_s": 5,'
    b' "decode": {"cluster": "pd", "kv_host": "127.0.0.1", "kv_port": 9000}}'
)


def test_sampling_params_on_the_wire_mirror_the_engine():
    eng = {f.name: f for f in dataclasses.fields(SamplingParams)}
    assert set(SamplingParamsMsg.model_fields) == set(eng)
    default = SamplingParams()
    assert SamplingParamsMsg().model_dump() == dataclasses.asdict(default)
    p = SamplingParams(
        temperature=0.5, top_p=0.9, top_k=5, max_tokens=7, seed=3, stop_token_ids=[1]
    )
    assert engine_params(params_msg(p)) == p


def test_engine_limits_mirror_the_engine_config():
    base = EngineConfig()
    for f in dataclasses.fields(EngineLimits):
        assert getattr(EngineLimits(), f.name) == getattr(base, f.name), f.name
    cfg = parse_deploy_config(
        {
            "secret": "x" * 16,
            "engine": {"max_model_len": 1024, "checkpoint_interval": 32, "max_num_seqs": 4},
            "clusters": [
                {
                    "name": "pd",
                    "kind": "pd",
                    "nodes": [{"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}],
                }
            ],
            "router": {"policy": "homogeneous"},
        }
    )
    ec, lim = cfg.engine_config("decode"), cfg.engine_limits()
    assert all(getattr(lim, f.name) == getattr(ec, f.name) for f in dataclasses.fields(lim))
    assert (lim.max_model_len, lim.checkpoint_interval, lim.max_num_seqs) == (1024, 32, 4)


def test_prefill_request_parses_strictly():
    req = PrefillRequest.model_validate_json(PREFILL)
    assert req.decode.kv_port == 9000 and req.params.temperature == 0.0 and req.timeout_s == 5.0
    assert PrefillRequest.model_validate_json(req.to_json()) == req
    for bad in (
        PREFILL.replace(b'"token_start": 0', b'"token_start": -1'),
        PREFILL.replace(b'"token_start": 0', b'"token_start": "0"'),
        PREFILL.replace(b'"token_start": 0', b'"token_start": true'),
        PREFILL.replace(b'"max_tokens": 4', b'"max_tokens": 4, "beam": 2'),
        PREFILL.replace(b'"request_id": "r1"', b'"request_id": ""'),
        PREFILL.replace(b"[1, 2, 3]", b"[1, 2.5]"),
        b"[]",
        b"not json",
    ):
        with pytest.raises(ValueError):
            PrefillRequest.model_validate_json(bad)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        DecodeRequest.model_validate_json(b'{"request_id": "r", "prompt_token_ids": []}')
    with pytest.raises(ValueError, match="tokens must be"):
        PrefixRequest(prompt_token_ids=[1, 2], tokens=3)


def test_decode_events_round_trip_as_ndjson_lines():
    evs = [
        ReadyEvent(node="d0", token_start=64, kv_addr=("127.0.0.1", 5555)),
        KVEvent(token_start=64, payload_bytes=10, wire_bytes=12, receive_s=0.5, timings={"a": 1.0}),
        TokenEvent(token_ids=[7, 8], finished=False, first_token_at=3.25),
        TokenEvent(token_ids=[], finished=True, finish_reason="length"),
        ErrorEvent(message="aborted by the router"),
    ]
    for ev in evs:
        line = event_line(ev)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert parse_decode_event(line) == ev
    with pytest.raises(ValueError):
        parse_decode_event(b'{"event": "tokens", "token_ids": []}')


def test_node_state_and_errors():
    st = NodeState(name="d0", cluster="pd", role="decode", pid=1, kv_addr=("h", 1))
    back = NodeState.model_validate_json(st.to_json())
    assert back == st and back.links == {} and back.stats.imports == 0
    with pytest.raises(ValueError):
        NodeState.model_validate_json(st.to_json().replace(b'"decode"', b'"mixed"'))
    assert error_message(b'{"error": {"code": "bad_request", "message": "no"}}') == "no"
    assert error_message(b"<html>boom</html>") == "<html>boom</html>"
    r = CacheEventsReply.model_validate_json(b'{"seq": 3, "events": []}')
    assert (r.seq, r.reset, r.node) == (3, False, [])
