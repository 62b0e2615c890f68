"""The OpenAI request models on the gateway's HTTP surface, in process (no node is reached: every
request here is refused before routing): OpenAI's ranges, unknown and unsupported fields as a 400
naming them, malformed JSON, and ``/openapi.json`` describing the bodies."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from prfaas.server.config import load_deploy_config
from prfaas.server.gateway.api import build_gateway_app
from prfaas.server.gateway.node_client import NodeEndpoint
from prfaas.server.gateway.router import Router


@pytest.fixture(scope="module")
def client() -> TestClient:
    cfg = load_deploy_config(full=False)
    eps = [
        NodeEndpoint(n.name, c.name, n.role, "http://127.0.0.1:1")
        for c in cfg.clusters
        for n in c.nodes
    ]
    return TestClient(build_gateway_app(Router(cfg, eps)))  # no lifespan: no polling


CMPL = {"model": "tiny", "prompt": "x"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True, "foo": 1}}, "stream_options.foo"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"model": ""}, "model"),
    ],
)
@pytest.mark.parametrize("path, base", [("/v1/completions", CMPL), ("/v1/chat/completions", CHAT)])
def test_out_of_range_and_unknown_fields_name_the_field(client, path, base, extra, param):
    r = client.post(path, json={**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split(".")[0] in err["message"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {**CMPL, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**CMPL, "suffix": "s"}, "suffix"),
        ("/v1/completions", {**CMPL, "best_of": 3}, "best_of"),
        ("/v1/completions", {"model": "tiny"}, "prompt"),
        ("/v1/completions", {**CMPL, "prompt": [1, 99999]}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, None),
        ("/v1/completions", {**CMPL, "response_format": {"type": "json_schema"}}, None),
        ("/v1/completions", {**CMPL, "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard"}]}, "messages.0.role"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "x", "name": "n"}]},
            "messages.0.name",
        ),
    ],
)
def test_unsupported_values_are_400_naming_them(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == (param or "response_format"), err


def test_malformed_json_and_non_objects(client):
    for content, headers in [
        (b"{not json", {"content-type": "application/json"}),
        (b"{not json", {}),
        (b"[]", {"content-type": "application/json"}),
    ]:
        r = client.post("/v1/completions", content=content, headers=headers)
        assert r.status_code == 400
        assert "JSON" in r.json()["error"]["message"]


def test_openapi_describes_the_request_bodies(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    ref = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert ref["schema"]["$ref"].endswith("/CompletionRequest")
    t = schemas["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert (t["minimum"], t["maximum"]) == (0, 2)
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
