"""CUDA graphs of the decode step against the eager step on a GPU (skipped without CUDA).

The engines here get an explicit cache (``num_blocks``): with memory planning each would take 90%
of the device, and these tests hold two at once."""

import copy
import dataclasses

import pytest
import torch

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.engine.model_runner import ModelRunner
from prfaas.model.batch import CacheTensors, SeqInput
from prfaas.model.config import PRESETS
from prfaas.model.model import HybridForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CFG = dataclasses.replace(
    PRESETS["small"], name="small-4l", num_hidden_layers=4, full_attn_layers=(1, 3)
)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _random_cache(nb: int, slots: int, seed: int, bs: int = 16) -> CacheTensors:
    """A cache of CFG's geometry on the GPU filled with random values."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    return CacheTensors(
        bs,
        [
            torch.randn(nb, bs, CFG.latent_dim, device=dev, generator=g).bfloat16()
            for _ in CFG.mla_layers
        ],
        [torch.randn(slots, 16, 128, 128, device=dev, generator=g) * 0.05 for _ in CFG.kda_layers],
        [
            torch.randn(slots, 3, CFG.kda_width, 3, device=dev, generator=g).bfloat16()
            for _ in CFG.kda_layers
        ],
    )


@torch.inference_mode()
def test_graph_replay_matches_eager_step():
    dev = torch.device("cuda")
    model = HybridForCausalLM(CFG).init_weights(0).to(dev, torch.bfloat16).eval()
    cache = _random_cache(nb=256, slots=16, seed=0)
    ref_cache = copy.deepcopy(cache)
    runner = ModelRunner(model)
    assert runner.graphs is not None
    starts = [100, 7, 513, 64, 250]
    tables = [list(range(i * 40, i * 40 + 40)) for i in range(5)]
    for step in range(3):  # replays after the first capture reuse the graph
        seqs = [
            SeqInput(torch.tensor([(31 * i + step) % 250]), s + step, tables[i], 2 * i + 1)
            for i, s in enumerate(starts)
        ]
        out = runner.step(seqs, cache)
        ref = model.step(seqs, ref_cache)
        assert _rel(out, ref) < 2e-2
        for a, b in zip(
            cache.kda_state + cache.mla_kv, ref_cache.kda_state + ref_cache.mla_kv, strict=True
        ):
            assert _rel(a, b) < 2e-2
    assert runner.num_graph_steps == 3 and len(runner.graphs) == 1  # bucket (8 rows, 40 blocks)
    for a, b in zip(cache.conv_state, ref_cache.conv_state, strict=True):
        assert _rel(a, b) < 2e-2
    # untouched slots are bit-identical: padding rows wrote back what they read
    for a, b in zip(cache.kda_state, ref_cache.kda_state, strict=True):
        assert torch.equal(a[[0, 2, 4, 6, 8, 10, 12, 14, 15]], b[[0, 2, 4, 6, 8, 10, 12, 14, 15]])


def test_engine_greedy_tokens_with_and_without_graphs():
    model = HybridForCausalLM(CFG).init_weights(1).to("cuda", torch.bfloat16).eval()

    def run(graphs):
        eng = LLMEngine(
            EngineConfig(model="small", max_num_seqs=8, cuda_graphs=graphs, num_blocks=512),
            model=model,
        )
        for i in range(6):
            eng.add_request(
                [(7 * i + j) % 250 for j in range(40 + 17 * i)],
                SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
            )
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.token_ids
        return done, eng

    ref, _ = run(False)
    got, eng = run(True)
    assert eng.runner.num_graph_steps >= 10
    same = sum(a == b for a, b in zip(sum(got.values(), []), sum(ref.values(), []), strict=True))
    assert same >= 0.9 * 6 * 16, (got, ref)  # bf16 GEMMs of other shapes may flip near-ties


@torch.inference_mode()
def test_graph_steps_back_to_back_without_sync():
    """Replays queued without a host sync in between each see their own inputs (the pinned
    staging buffer is not overwritten before its copy has run)."""
    dev = torch.device("cuda")
    model = HybridForCausalLM(CFG).init_weights(2).to(dev, torch.bfloat16).eval()
    cache = _random_cache(nb=64, slots=4, seed=1)
    ref_cache = copy.deepcopy(cache)
    graphs, static = ModelRunner(model), ModelRunner(model, cuda_graphs=False, pad=True)
    steps = [
        [SeqInput(torch.tensor([(17 * i + 3) % 250]), 300 + i, list(range(32)), 1)]
        for i in range(8)
    ]
    graphs.step(steps[0], cache)  # captures
    static.step(steps[0], ref_cache)
    torch.cuda.synchronize()
    outs = [graphs.step(s, cache) for s in steps[1:]]  # queued back to back, no synchronisation
    refs = [static.step(s, ref_cache) for s in steps[1:]]
    for o, r in zip(outs, refs, strict=True):
        assert _rel(o, r) < 1e-3


@torch.inference_mode()
def test_fused_chunked_prefill_matches_torch_path(monkeypatch):
    """A prefill in three chunks (the later ones start from a carried conv and recurrent state)
    through the fused path (fla conv + chunked KDA, Triton norms) against the PyTorch path."""
    model = HybridForCausalLM(CFG).init_weights(3).to("cuda", torch.bfloat16).eval()
    toks = torch.tensor([(11 * i + 5) % 250 for i in range(230)])
    bounds = [(0, 100), (100, 103), (103, 230)]  # a 3-token chunk: shorter than the conv kernel

    def run(disable: str):
        monkeypatch.setenv("PRFAAS_DISABLE_FLA", disable)
        cache = _random_cache(nb=32, slots=2, seed=4)
        for t in (*cache.kda_state, *cache.conv_state):
            t.zero_()
        outs = [model.step([SeqInput(toks[a:b], a, list(range(16)), 0)], cache) for a, b in bounds]
        return outs, cache

    fused, fc = run("0")
    ref, rc = run("1")
    for o, r in zip(fused, ref, strict=True):
        assert _rel(o, r) < 3e-2
    for a, b in zip(fc.kda_state + fc.conv_state, rc.kda_state + rc.conv_state, strict=True):
        assert _rel(a[0], b[0]) < 3e-2


@torch.inference_mode()
def test_gpu_export_over_tcp_through_pinned_memory():
    """A prefill engine's export stays on the GPU; the tcp sender stages it through pinned memory
    (from a thread whose current device may differ), the receiver lands it in pinned buffers: the
    bytes are the export's, and a decode engine importing them decodes what one importing the
    export directly does."""
    import threading

    from prfaas.server.node.kv_layout import layout_for_engine
    from prfaas.transfer.registry import create_receiver, create_sender

    model = HybridForCausalLM(CFG).init_weights(5).to("cuda", torch.bfloat16).eval()
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [(5 * i + 1) % 250 for i in range(300)]

    def engine(role):
        return LLMEngine(
            EngineConfig(model="small", role=role, max_num_seqs=4, num_blocks=512), model=model
        )

    def decode(exp):
        dec = engine("decode")
        dec.import_request(exp, sp)
        done = []
        while dec.has_unfinished():
            done += [o for o in dec.step() if o.finished]
        return done[-1].token_ids

    pre = engine("prefill")
    rid = pre.add_request(prompt, sp)
    while pre.has_unfinished():
        pre.step()
    exp = pre.export_request(rid)
    pre.release(rid)
    assert all(t.is_cuda for p in exp.parts for t in p.tensors.values())
    secret = "gpu-test-secret-0123456789"
    rx = create_receiver("tcp", layout_for_engine(pre), secret, pin_memory=True).start()
    tx = create_sender("tcp", layout_for_engine(pre), secret)
    try:
        th = threading.Thread(target=lambda: tx.send_export(rx.address, exp).wait(30))
        th.start()
        th.join(60)
        d = rx.deliveries.get(timeout=30)
        for got, sent in zip(d.export.parts, exp.parts, strict=True):
            for k, t in sent.tensors.items():
                assert got.tensors[k].is_pinned()
                assert torch.equal(got.tensors[k], t.cpu())
        assert decode(d.export) == decode(exp)
        d.release()
    finally:
        tx.close()
        rx.close()


def test_async_decode_gives_the_synchronous_tokens():
    """Pipelined greedy decode on the GPU (graph inputs' tokens written on the device, host copies
    of the tokens through pinned memory): the same tokens as the synchronous engine."""
    model = HybridForCausalLM(CFG).init_weights(6).to("cuda", torch.bfloat16).eval()

    def run(pipelined):
        eng = LLMEngine(
            EngineConfig(model="small", max_num_seqs=8, async_decode=pipelined, num_blocks=512),
            model=model,
        )
        ids = [
            eng.add_request(
                [(3 * i + j) % 250 for j in range(30 + 11 * i)],
                SamplingParams(temperature=0, max_tokens=10 + 3 * i, ignore_eos=True),
            )
            for i in range(6)
        ]
        done = {}
        while eng.has_unfinished():
            done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
        return [done[i] for i in ids], eng

    want, _ = run(False)
    got, eng = run(True)
    assert got == want and eng.num_pipelined_steps > 10
