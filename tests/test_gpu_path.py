"""The static-shape decode path (what CUDA graphs capture) against the eager step, on the CPU."""

import copy

import pytest
import torch

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.engine.cuda_graphs import pack_views
from prfaas.engine.model_runner import ModelRunner, blocks_bucket, bucket, pack_decode
from prfaas.model.batch import CacheTensors, SeqInput


def _cache(cfg, gen, num_blocks=32, block_size=8, slots=8):
    """A cache full of random values (not zeros: padding must leave every value as it was)."""

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    return CacheTensors(
        block_size,
        [r(num_blocks, block_size, cfg.latent_dim) for _ in cfg.mla_layers],
        [
            r(slots, cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_head_dim) * 0.1
            for _ in cfg.kda_layers
        ],
        [r(slots, 3, cfg.kda_width, cfg.short_conv_kernel_size - 1) for _ in cfg.kda_layers],
    )


def _decode_batch(gen):
    # three sequences mid-decode: distinct slots, disjoint block tables, tables longer than needed
    return [
        SeqInput(torch.randint(0, 256, (1,), generator=gen), 37, [4, 9, 1, 20, 21, 22], 5),
        SeqInput(torch.randint(0, 256, (1,), generator=gen), 8, [2, 3, 30], 0),
        SeqInput(torch.randint(0, 256, (1,), generator=gen), 15, [11, 12], 3),
    ]


def _all(c):
    return [*c.mla_kv, *c.kda_state, *c.conv_state]


@pytest.mark.parametrize("pad", [False, True])
def test_static_decode_matches_eager_step(tiny_model, pad):
    gen = torch.Generator().manual_seed(1)
    cache = _cache(tiny_model.config, gen)
    seqs = _decode_batch(gen)
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad():
        ref = tiny_model.step(seqs, ref_cache)
        runner = ModelRunner(tiny_model, cuda_graphs=True, pad=pad)  # no CUDA: no graphs
        assert runner.graphs is None
        out = runner.step(seqs, cache)
    assert out.shape == ref.shape == (3, tiny_model.config.vocab_size)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert runner.num_decode_steps == 1 and runner.num_eager_steps == 0
    for a, b in zip(_all(cache), _all(ref_cache), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    # rows and slots the real sequences do not touch are bit-identical (padding wrote back)
    untouched = [s for s in range(8) if s not in (5, 0, 3)]
    for a, b in zip(
        cache.kda_state + cache.conv_state, ref_cache.kda_state + ref_cache.conv_state, strict=True
    ):
        assert torch.equal(a[untouched], b[untouched])
    for a, b in zip(cache.mla_kv, ref_cache.mla_kv, strict=True):
        a, b = a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1])
        written = [21 * 8 + 5, 3 * 8 + 0, 12 * 8 + 7]  # rows of positions 37, 8, 15
        keep = torch.ones(a.shape[0], dtype=torch.bool)
        keep[written] = False
        assert torch.equal(a[keep], b[keep])


def test_pack_decode_layout_and_padding(tiny_model):
    gen = torch.Generator().manual_seed(2)
    cache = _cache(tiny_model.config, gen)
    seqs = _decode_batch(gen)
    packed = pack_decode(seqs, cache, batch=4, blocks=16)
    b = pack_views(packed, 4, 16)
    assert b.tokens[:3].tolist() == [int(s.token_ids[0]) for s in seqs]
    assert b.slots.tolist()[:3] == [5, 0, 3] and b.slots[3].item() not in (5, 0, 3)
    assert b.new_rows[:3].tolist() == [21 * 8 + 5, 3 * 8 + 0, 12 * 8 + 7]
    assert b.new_rows[3].item() == 32 * 8 - 1  # the last cache row, used by no real row
    assert b.lengths.tolist() == [38, 9, 16, 1]
    assert b.valid.tolist() == [1, 1, 1, 0]
    assert b.block_tables[0, :5].tolist() == [4, 9, 1, 20, 21] and b.block_tables[0, 5:].sum() == 0
    assert b.block_tables[2, :2].tolist() == [11, 12]


def test_pack_decode_bad_input(tiny_model):
    gen = torch.Generator().manual_seed(3)
    cache = _cache(tiny_model.config, gen)
    seqs = _decode_batch(gen)
    with pytest.raises(ValueError, match="cannot pad"):
        pack_decode(seqs, cache, batch=2, blocks=16)
    with pytest.raises(ValueError, match="cannot pad"):
        pack_decode(seqs, cache, batch=9, blocks=16)  # only 8 state slots
    with pytest.raises(ValueError, match="needs 5 blocks"):
        pack_decode(seqs, cache, batch=4, blocks=4)
    short = [SeqInput(torch.tensor([1]), 40, [1, 2], 0)]
    with pytest.raises(ValueError, match="the table has 2"):
        pack_decode(short, cache, batch=1, blocks=16)
    with pytest.raises(ValueError, match="does not hold"):
        pack_views(torch.zeros(10, dtype=torch.long), 2, 3)
    runner = ModelRunner(tiny_model)
    with pytest.raises(ValueError, match="one new token"):
        runner.decode([SeqInput(torch.tensor([1, 2]), 4, [0], 0)], cache)


def test_buckets():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 3, 8, 9)] == [1, 4, 8, 9]
    got = [blocks_bucket(n, 10**6) for n in range(1, 161)]
    assert sorted(set(got)) == [16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160]
    assert all(n <= b for n, b in zip(range(1, 161), got, strict=True))
    assert [blocks_bucket(n, 1000) for n in (17, 65, 600, 900)] == [20, 80, 640, 1000]
    assert blocks_bucket(5, 8) == 8 and blocks_bucket(12, 8) == 12


def test_runner_sends_prefill_and_streaming_steps_to_model_step(tiny_model):
    gen = torch.Generator().manual_seed(4)
    cache = _cache(tiny_model.config, gen)
    runner = ModelRunner(tiny_model)
    with torch.no_grad():
        runner.step([SeqInput(torch.tensor([5, 6, 7]), 0, [1], 2)], cache)
        seen = []
        runner.step([SeqInput(torch.tensor([8]), 3, [1], 2)], cache, seen.append)
    assert runner.num_eager_steps == 2 and runner.num_decode_steps == 0
    assert seen == list(range(tiny_model.config.num_hidden_layers))


def test_engine_tokens_equal_with_and_without_the_decode_path(tiny_model):
    def run(static):
        # the reference: the model's own step (which takes no device tokens: not pipelined)
        cfg = EngineConfig(model="tiny", max_num_seqs=4, async_decode=static)
        eng = LLMEngine(cfg, model=tiny_model)
        if not static:
            eng.runner.step = tiny_model.step
        ids = [
            eng.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            for p in ([3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9], [2, 7])
        ]
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.token_ids
        return [done[i] for i in ids], eng

    ref, _ = run(False)
    got, eng = run(True)
    assert got == ref
    assert eng.runner.num_decode_steps >= 10


def test_fused_projection_weights_follow_in_place_updates(tiny_model):
    model = copy.deepcopy(tiny_model)
    attn = model.model.layers[0].self_attn
    W = attn.W
    x = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        before = attn(x, None, None)[0]
        assert torch.equal(attn._in_weight()[:W], attn.q_proj.weight)
        attn.q_proj.weight.mul_(2.0)
        attn.v_conv1d.weight.mul_(0.5)
        assert torch.equal(attn._in_weight()[:W], attn.q_proj.weight)
        assert torch.equal(attn._conv_weight()[2 * W :], attn.v_conv1d.weight[:, 0])
        after = attn(x, None, None)[0]
    assert not torch.allclose(before, after)
