"""The sampler's OpenAI/vLLM features against references computed directly from the model's
logits (the cache-free forward): logprobs and top logprobs, repetition / frequency / presence
penalties, logit_bias, min_tokens, min_p."""

from __future__ import annotations

import pytest
import torch

from prfaas import EngineConfig, LLMEngine, SamplingParams

EOS = 257  # the byte tokenizer's


_ENGINES: dict[int, LLMEngine] = {}


def run(model, prompt, params):
    eng = _ENGINES.setdefault(id(model), LLMEngine(EngineConfig(model="tiny"), model=model))
    rid = eng.add_request(prompt, params)
    out = None
    for _ in range(1000):
        for o in eng.step():
            if o.request_id == rid and o.finished:
                out = o
        if out is not None:
            return out
    raise AssertionError("request did not finish")


def logits_at(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


def processed(logits, prompt, output, p: SamplingParams, stop_ids=()):
    """The processing written out per token, independently of the sampler's tensor code."""
    x = logits.clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt) | set(output):
        v = float(x[t])
        x[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    if len(output) < p.min_tokens:
        for t in stop_ids:
            x[t] = float("-inf")
    return x


PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32] * 3


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_log_softmax_of_the_sampled_positions_logits(tiny_model, temperature):
    p = SamplingParams(temperature=temperature, seed=5, max_tokens=6, ignore_eos=True, logprobs=5)
    out = run(tiny_model, PROMPT, p)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    ids = list(PROMPT)
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        ref = torch.log_softmax(logits_at(tiny_model, ids), -1)
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
        vals, top = torch.topk(ref, 5)
        assert [t for t, _ in lp.top] == top.tolist()
        assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=1e-4)
        ids.append(tok)
    # without logprobs asked, none are kept
    assert run(tiny_model, PROMPT, SamplingParams(temperature=0, max_tokens=2)).logprobs is None


@pytest.mark.parametrize(
    "kw",
    [
        {"repetition_penalty": 0.3},  # favours seen tokens: the output repeats some
        {"repetition_penalty": 0.3, "frequency_penalty": 2.0},
        {"repetition_penalty": 0.3, "presence_penalty": 2.0},
        {"repetition_penalty": 0.3, "frequency_penalty": -1.0, "logit_bias": {101: 3.0}},
    ],
)
def test_penalties_equal_the_reference_processing(tiny_model, kw):
    n = 8
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)
    got = run(tiny_model, PROMPT, p).token_ids
    ids, out = list(PROMPT), []
    for _ in range(n):
        tok = int(processed(logits_at(tiny_model, ids), PROMPT, out, p).argmax())
        out.append(tok)
        ids.append(tok)
    assert got == out
    plain = run(tiny_model, PROMPT, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert plain.token_ids != got  # the penalty changed something: the test has teeth


def test_logit_bias_forces_and_bans_tokens(tiny_model):
    forced = run(tiny_model, PROMPT, SamplingParams(max_tokens=5, logit_bias={65: 100.0}, seed=1))
    assert forced.token_ids == [65] * 5
    plain = run(tiny_model, PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    ban = {t: -100.0 for t in set(plain.token_ids)}
    banned = run(
        tiny_model,
        PROMPT,
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias=ban),
    )
    assert not set(banned.token_ids) & set(ban)


def test_min_tokens_holds_back_eos_and_stop_tokens(tiny_model):
    eos_first = SamplingParams(temperature=0, max_tokens=20, logit_bias={EOS: 100.0})
    assert run(tiny_model, PROMPT, eos_first).token_ids == [EOS]
    p = SamplingParams(temperature=0, max_tokens=20, logit_bias={EOS: 100.0}, min_tokens=5)
    out = run(tiny_model, PROMPT, p)
    assert len(out.token_ids) == 6 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:5]
    assert out.finish_reason == "stop"
    p = SamplingParams(
        temperature=0, max_tokens=20, stop_token_ids=[66], logit_bias={66: 100.0}, min_tokens=3
    )
    out = run(tiny_model, PROMPT, p)
    assert len(out.token_ids) == 4 and out.token_ids[-1] == 66 and 66 not in out.token_ids[:3]


def test_min_p_one_keeps_only_the_most_likely_token(tiny_model):
    greedy = run(tiny_model, PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    p = SamplingParams(temperature=1.5, min_p=1.0, seed=3, max_tokens=8, ignore_eos=True)
    assert run(tiny_model, PROMPT, p).token_ids == greedy.token_ids


def test_bad_values_are_refused():
    for kw in [
        {"presence_penalty": 3},
        {"repetition_penalty": 0},
        {"min_tokens": -1},
        {"min_p": 2},
        {"logprobs": 21},
    ]:
        with pytest.raises(ValueError):
            SamplingParams(**kw)
