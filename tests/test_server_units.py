"""Server parts without processes: deployment config, OpenAI request parsing, chat template, stop
strings on detokenized text, the router's state and decisions, the engine thread, the KV layout."""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.model.tokenizer import ByteTokenizer
from prfaas.scheduling.types import INF
from prfaas.server.config import load_deploy_config, parse_deploy_config
from prfaas.server.gateway.node_client import NodeEndpoint
from prfaas.server.gateway.openai_protocol import APIError, parse_request
from prfaas.server.gateway.router import Router
from prfaas.server.gateway.text_output import TextAssembler
from prfaas.server.launcher import endpoints_from_config
from prfaas.server.node.engine_worker import EngineWorker
from prfaas.server.node.kv_layout import layout_for_engine
from prfaas.server.protocol import LinkReading, NodeState, SamplingParamsMsg
from prfaas.tokenizer.chat import load_chat_format
from prfaas.transfer import wire

BASE = {
    "model": "tiny",
    "secret": "unit-secret-0123456789",
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "f0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [
                {"name": "p0", "role": "prefill"},
                {"name": "d0", "role": "decode"},
                {"name": "d1", "role": "decode"},
            ],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0, "rtt_ms": 5}],
    "router": {"threshold": 256},
}


def cfg_with(**changes):
    d = copy.deepcopy(BASE)
    for k, v in changes.items():
        d[k] = v
    return d


# ------------------------------------------------------------------------ config


def test_default_config_is_the_readme_deployment():
    cfg = load_deploy_config()
    assert [(c.name, c.kind, [n.role for n in c.nodes]) for c in cfg.clusters] == [
        ("prfaas", "prfaas", ["prefill"]),
        ("pd", "pd", ["prefill", "decode"]),
    ]
    assert cfg.model == "tiny" and cfg.device == "cpu"
    # the whole scheduler by default: no hand-set t; the packaged profile of tiny on CPU
    assert cfg.router.threshold is None and cfg.router.rebalance
    assert cfg.profile_path().name == "profile_tiny_cpu.yaml" and cfg.profile_path().is_file()
    assert cfg.link("prfaas", "pd").spec().build().current_gbps() == 1.0
    assert all(n.host == "127.0.0.1" for c in cfg.clusters for n in c.nodes)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"secret": "short"}, "at least 16"),
        ({"transfer_backend": "carrier-pigeon"}, "transfer_backend"),
        ({"router": {"policy": "random"}}, "router.policy"),
        ({"router": {"cache_mode": "abundant"}}, "cache_mode"),
        ({"router": {"max_inflight": 0}}, "max_inflight"),
        ({"router": {"bogus": 1}}, "unknown keys"),
        ({"links": [{"src": "prfaas", "dst": "nowhere", "gbps": 1}]}, "unknown cluster"),
        ({"links": [{"src": "prfaas", "dst": "pd", "gbps": -1}]}, "bandwidth"),
        ({"engine": {"max_num_seqs": 0}}, "max_num_seqs"),
        ({"clusters": [BASE["clusters"][0]]}, "exactly one PD cluster"),
    ],
)
def test_bad_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        parse_deploy_config(cfg_with(**change))


def test_bad_nodes_are_refused():
    d = cfg_with()
    d["clusters"][0]["nodes"][0]["role"] = "decode"
    with pytest.raises(ValueError, match="prefill nodes only"):
        parse_deploy_config(d)
    d = cfg_with()
    d["clusters"][1]["nodes"][0]["name"] = "f0"
    with pytest.raises(ValueError, match="used twice"):
        parse_deploy_config(d)
    d = cfg_with()
    d["clusters"][1]["nodes"] = [{"name": "d0", "role": "decode"}]
    with pytest.raises(ValueError, match="at least one prefill and one decode"):
        parse_deploy_config(d)
    with pytest.raises(ValueError, match="does not exist"):
        load_deploy_config("/nonexistent/deploy.yaml")
    # separate machines need fixed ports
    with pytest.raises(ValueError, match="http_port must be set"):
        endpoints_from_config(parse_deploy_config(cfg_with()))


# ------------------------------------------------------------------------ OpenAI protocol


def test_chat_messages_validated_then_rendered_by_the_models_template():
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "S"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
    }
    req = parse_request(body, "chat", 384)
    tok = ByteTokenizer()
    fmt = load_chat_format("tiny", tok)
    assert fmt.render(req.messages) == "<|system|>\nS\n<|user|>\nab\n<|assistant|>\n"
    for msgs, param in [
        ([{"role": "wizard", "content": "x"}], "messages.0.role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages.0.content.0.type"),
    ]:
        with pytest.raises(APIError) as e:
            parse_request({"model": "m", "messages": msgs}, "chat", 384)
        assert e.value.status == 400 and e.value.param == param


def test_parse_request_maps_every_field():
    body = {
        "model": "tiny",
        "prompt": ["hello"],
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.8,
        "seed": 3,
        "stop": "\n",
        "stop_token_ids": [10, 257],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = parse_request(body, "completion", 384)
    assert r.prompts == ["hello"] and r.stop == ["\n"] and r.stream and r.include_usage
    assert r.params == SamplingParamsMsg(
        temperature=0.5, top_p=0.8, max_tokens=7, seed=3, stop_token_ids=[10, 257]
    )
    chat = parse_request(
        {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 3},
        "chat",
        384,
    )
    assert chat.messages == [{"role": "user", "content": "q"}] and chat.params.max_tokens == 3


@pytest.mark.parametrize(
    "body, param",
    [
        ([], None),
        ({"model": "m", "prompt": [[1], []]}, "prompt"),
        ({"model": "m", "prompt": [1, -1]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "x", "stop": ["a"] * 9}, "stop"),
        ({"model": "m", "prompt": "x", "stop_token_ids": [500]}, "stop_token_ids"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"model": "m", "prompt": "x", "logit_bias": {"999": 1}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ],
)
def test_parse_request_errors(body, param):
    with pytest.raises(APIError) as e:
        parse_request(body, "completion", 384)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------ stop strings


def feed(asm: TextAssembler, ids: list[int]) -> str:
    out = "".join(asm.add([t]) for t in ids)
    return out + asm.finish()


def test_stop_string_across_tokens_never_leaks():
    tok = ByteTokenizer()
    ids = tok.encode("hello STOP world")
    asm = TextAssembler(tok, ["STOP", "zzz"])
    pieces = [asm.add([t]) for t in ids]
    assert "".join(pieces) + asm.finish() == "hello "
    assert asm.stopped and "S" not in "".join(pieces)
    # no stop: everything, incrementally, equal to decoding all at once
    asm = TextAssembler(tok, [])
    assert feed(asm, ids) == "hello STOP world" and not asm.stopped


def test_utf8_is_held_back_until_complete():
    tok = ByteTokenizer()
    ids = tok.encode("é€x")
    asm = TextAssembler(tok, [])
    outs = [asm.add([t]) for t in ids]
    assert outs == ["", "é", "", "", "€", "x"]
    # a stop string made of a multi-byte character
    assert feed(TextAssembler(tok, ["€"]), ids) == "é"
    # invalid bytes stay replacement characters (as the offline engine decodes them)
    assert feed(TextAssembler(tok, []), [0xFF, 0x41]) == tok.decode([0xFF, 0x41]) == "\ufffdA"


@pytest.mark.parametrize(
    "min_tokens, out",
    [
        (0, "ab"),  # "X" ends at token 3
        (2, "ab"),
        (3, "abXcd"),  # the first "X" is within the first 3 tokens: the next one stops
        (7, "abXcdXef"),  # every "X" is within the first 7 tokens
        (8, "abXcdXef"),
    ],
)
def test_stop_strings_count_only_after_min_tokens(min_tokens, out):
    # as vLLM: a stop string must end after the text of the first min_tokens tokens
    tok = ByteTokenizer()
    assert feed(TextAssembler(tok, ["X"], min_tokens), tok.encode("abXcdXef")) == out
    # one that starts within them and ends after them stops
    asm = TextAssembler(tok, ["cd"], 4)
    assert feed(asm, tok.encode("abXcdXef")) == "abX" and asm.stopped


# ------------------------------------------------------------------------ router decisions


@pytest.fixture
def router():
    cfg = parse_deploy_config(cfg_with())
    eps = [
        NodeEndpoint("f0", "prfaas", "prefill", "http://h:1"),
        NodeEndpoint("p0", "pd", "prefill", "http://h:2"),
        NodeEndpoint("d0", "pd", "decode", "http://h:3"),
        NodeEndpoint("d1", "pd", "decode", "http://h:4"),
    ]
    return Router(cfg, eps)


def info(router, prompt):
    from prfaas.scheduling.types import RequestInfo

    return RequestInfo("r", len(prompt), router.hash_ids(prompt))


def f0_state(up: bool) -> NodeState:
    """The PrfaaS node's reading with its link to the PD cluster up or cut."""
    return NodeState(
        name="f0", cluster="prfaas", role="prefill", pid=1, links={"pd": LinkReading(up=up)}
    )


def test_router_state_mirrors_the_deployment(router):
    st = router.build_state(now=100.0)
    pd = st.clusters["pd"]
    assert pd.prefill.busy_until == [0.0, INF, INF]  # decode nodes take no prefill work
    assert pd.decode.bs_max == [0, 32, 32] and pd.decode.load == [INF, 0.0, 0.0]
    assert st.clusters["prfaas"].prefill.busy_until == [0.0]
    assert st.links[("prfaas", "pd")].capacity_gbps == 1.0
    # the observer's busy times come from the deployment's hardware profile (tiny on CPU)
    prompt = list(range(200))
    d = router.route(info(router, prompt))
    assert (d.prefill_cluster, d.prefill_instance, d.decode_instance) == ("pd", 0, 1)
    t = router.sched.observer.prefill_time("pd", 200)
    st = router.build_state()
    assert st.clusters["pd"].prefill.busy_until[0] == pytest.approx(st.now + t, abs=0.05)
    assert st.clusters["pd"].decode.load == [INF, 1 / 32, 0.0]
    router.sched.kv_delivered("r")
    assert st.clusters["pd"].decode.slots_used == [0, 1, 0]
    router.sched.decode_done("r", output_len=7)
    assert st.clusters["pd"].decode.load == [INF, 0.0, 0.0] and list(st.recent_output) == [7]


def test_router_threshold_prefix_and_fallback(router):
    rng = random.Random(0)
    long, short = [rng.randrange(256) for _ in range(300)], [rng.randrange(256) for _ in range(200)]
    d = router.decide(info(router, long))
    assert (d.prefill_cluster, d.decode_cluster, d.uncached_len) == ("prfaas", "pd", 300)
    assert router.decide(info(router, short)).prefill_cluster == "pd"
    # hash blocks are engine checkpoints (64 tokens); at least one token is left to compute
    assert len(router.hash_ids(long)) == 4 and len(router.hash_ids(long[:257])) == 4
    assert len(router.hash_ids(long[:256])) == 3
    # a PD-P prefix hit makes the uncached part short: PD-P prefills (scarce mode)
    router.prefix["pd"].insert(router.hash_ids(long), 300, 0)
    d = router.decide(info(router, long))
    assert (d.prefill_cluster, d.cached_len, d.uncached_len) == ("pd", 256, 44)
    # the PrfaaS node down (or its link cut): the policy itself falls back to PD-P
    fresh = type(router.prefix["pd"])(64, 64)  # the index the observer reads, emptied
    router.prefix["pd"] = router.build_state().clusters["pd"].prefix = fresh
    router.mark_down("f0")
    assert router.decide(info(router, long)).prefill_cluster == "pd"
    router.live.node_up["f0"] = True
    router.live.node_state["f0"] = f0_state(up=False)
    assert router.decide(info(router, long)).prefill_cluster == "pd"
    router.live.node_state["f0"] = f0_state(up=True)
    assert router.decide(info(router, long)).prefill_cluster == "prfaas"
    # decode placement: least loaded, dead nodes skipped, none left -> 503
    assert router.route(info(router, short)).decode_instance == 1  # d0 now holds one request
    assert router.decide(info(router, short)).decode_instance == 2
    router.mark_down("d1")
    assert router.decide(info(router, short)).decode_instance == 1
    router.mark_down("d0")
    with pytest.raises(APIError) as e:
        router.decide(info(router, short))
    assert e.value.status == 503 and e.value.code == "no_capacity"


# ------------------------------------------------------------------------ engine thread, layout


def test_engine_worker_runs_requests_like_the_offline_engine(tiny_model):
    prompts = [[random.Random(i).randrange(256) for _ in range(20 + 30 * i)] for i in range(3)]
    sp = SamplingParams(temperature=0.7, seed=9, max_tokens=6, ignore_eos=True)
    offline = LLMEngine(EngineConfig(model="tiny"), model=tiny_model)
    want = {}
    for i, p in enumerate(prompts):
        offline.add_request(p, sp, f"r{i}")
    while offline.has_unfinished():
        for o in offline.step():
            if o.finished:
                want[o.request_id] = o.token_ids
    w = EngineWorker(LLMEngine(EngineConfig(model="tiny"), model=tiny_model)).start()
    got, done = {}, threading.Event()

    def on_out(o):
        if o.finished:
            got[o.request_id] = o.token_ids
            if len(got) == 3:
                done.set()

    try:
        for i, p in enumerate(prompts):
            w.subscribe(f"r{i}", on_out)
            w.call(lambda eng, p=p, i=i: eng.add_request(p, sp, f"r{i}")).result(10)
        with pytest.raises(ValueError, match="empty"):
            w.call(lambda eng: eng.add_request([], sp)).result(10)
        assert done.wait(30)
    finally:
        w.stop()
    assert got == want


def test_kv_layout_matches_engine_exports(tiny_model):
    eng = LLMEngine(EngineConfig(model="tiny", role="prefill"), model=tiny_model)
    eng.add_request(list(range(100)), SamplingParams(max_tokens=2), "a")
    while eng.has_unfinished():
        eng.step()
    exp = eng.export_request("a", token_start=32)
    layout = layout_for_engine(eng)
    assert layout.request_nbytes(
        67
    )  # tokens [32, 99): the decode node computes token 99 == exp.nbytes()
    wh = wire.build_wire_header(exp.header, layout, 1, exp.parts)
    wire.validate_header(wh, layout, 1 << 30)  # the receiver accepts it
    assert exp.parts[3].tensors["kv"].dtype == torch.float32


# ------------------------------------------------------------------------ node routes (in process)


def test_node_routes_answer_protocol_messages(tiny_model):
    import asyncio

    import httpx

    from prfaas.server.auth import control_headers
    from prfaas.server.node.server import NodeServer
    from prfaas.server.protocol import ErrorBody, LinkAdminResult, NodeHealth

    cfg = parse_deploy_config(cfg_with())
    nodes = {
        n: NodeServer(cfg, n, engine=LLMEngine(cfg.node_engine_config(n), model=tiny_model))
        for n in ("p0", "d0")
    }

    async def scenario() -> None:
        auth = control_headers(cfg.secret)
        p0 = httpx.AsyncClient(
            transport=httpx.ASGITransport(nodes["p0"].app), base_url="http://p0", headers=auth
        )
        d0 = httpx.AsyncClient(
            transport=httpx.ASGITransport(nodes["d0"].app), base_url="http://d0", headers=auth
        )
        h = NodeHealth.model_validate_json((await p0.get("/health")).content)
        assert (h.name, h.role) == ("p0", "prefill")
        st = NodeState.model_validate_json((await d0.get("/state")).content)
        assert (st.role, st.waiting, st.running, st.max_num_seqs) == ("decode", 0, 0, 32)
        body = {
            "request_id": "r",
            "prompt_token_ids": [1, 2, 3],
            "decode": {"cluster": "pd", "kv_host": "127.0.0.1", "kv_port": 1},
        }
        r = await d0.post("/internal/prefill", json=body)
        assert r.status_code == 400 and ErrorBody.model_validate_json(r.content).error.code == (
            "wrong_role"
        )
        for bad in ({**body, "extra": 1}, {**body, "token_start": -1}, {**body, "params": []}):
            r = await p0.post("/internal/prefill", json=bad)
            assert r.status_code == 400, bad
            assert ErrorBody.model_validate_json(r.content).error.code == "bad_request"
        r = await d0.post("/internal/decode", json={"request_id": "r", "prompt_token_ids": []})
        assert r.status_code == 400
        r = await p0.post("/admin/link", json={"cluster": "pd", "up": "no"})
        assert r.status_code == 400
        r = await p0.post("/admin/link", json={"cluster": "pd", "up": False})
        assert LinkAdminResult.model_validate_json(r.content).aborted == 0
        st = NodeState.model_validate_json((await p0.get("/state")).content)
        assert st.links["pd"].up is False
        # a cut link refuses the prefill before any work: 503 transfer_failed, counted
        r = await p0.post("/internal/prefill", json=body)
        assert r.status_code == 503
        assert ErrorBody.model_validate_json(r.content).error.code == "transfer_failed"
        st = NodeState.model_validate_json((await p0.get("/state")).content)
        assert st.stats.prefill_failures == 1 and st.stats.prefills == 0
        await p0.aclose(), await d0.aclose()

    for n in nodes.values():
        n.start()
    try:
        asyncio.run(scenario())
    finally:
        for n in nodes.values():
            n.close()
