"""The whole-batch MoE on a GPU against the reference loop, and a few layers of the 48B geometry
end to end (run on a GPU machine; ``--preset tiny --device cpu`` is a CPU dry run).

1. One MoE layer of Kimi-Linear-48B-A3B (256 experts, top-8, one shared expert, hidden 2304,
   expert width 1024), bf16, random weights: ``SparseMoE.forward_grouped`` (sort permutation,
   ``torch._grouped_mm``, fused SiLU-mul) against ``forward_reference`` (a loop over experts) at
   several token counts: relative L2 error, device time of each, the bytes of the experts the
   tokens chose over the measured time; then the grouped path captured in a CUDA graph and
   replayed on new inputs, compared with eager.
2. The 48B geometry cut to ``--layers`` layers (MLA at layer 3, MoE from layer 1), random
   weights, ``--prompts`` random prompts of ``--prefill`` tokens each followed by ``--steps``
   teacher-forced decode steps: logits of the fused path against the PyTorch path and both
   against a fp32 copy of the weights (PyTorch path), unforced and with every run's experts
   forced to the fp32 run's choices (random routers tie), the latter with the default precision
   (fp32 residual stream and logits) and the legacy one (both bf16). Argmax agreement is pooled
   over every logit vector of every prompt with a 95% Wilson interval; the margin analysis
   gives the fp32 top-2 margin against the bf16 noise where the paths disagree. Then the
   CUDA-graph decode against the eager static decode, and greedy tokens of the engine with and
   without graphs.

    python benchmarks/gpu_check_moe.py --tokens 1 8 128 1024 32768 --layers 5 --prefill 1024 \
        --prompts 4 --steps 128 --out benchmarks/results/moe_gpu_check_h200.json
    python benchmarks/gpu_check_moe.py --preset tiny --device cpu --tokens 1 8 --layers 5 \
        --prefill 40 --prompts 2 --steps 8        # the CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check_model import compare, forced_logits, rel  # noqa: E402
from prfaas import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from prfaas.model import moe_ops  # noqa: E402
from prfaas.model.checkpoint import keeps_fp32  # noqa: E402
from prfaas.model.config import PRESETS  # noqa: E402
from prfaas.model.layers import SparseMoE  # noqa: E402
from prfaas.model.materialize import empty_model, random_model  # noqa: E402


def agreement_ci(agree: int, n: int, z: float = 1.96) -> dict:
    """``agree`` of ``n`` steps with the same argmax: the fraction and its Wilson score interval
    (95% for z = 1.96; steps treated as independent trials)."""
    if n == 0:
        return {"argmax_agree": None, "agree": 0, "of": 0, "ci95": None}
    p = agree / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return {
        "argmax_agree": p,
        "agree": agree,
        "of": n,
        "ci95": [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)],
    }


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():  # CPU dry run
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


@torch.inference_mode()
def moe_layer_check(tokens: list[int], preset: str, dev: str) -> dict:
    cfg = PRESETS[preset]
    with torch.device(dev):
        moe = SparseMoE(cfg).to(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    for n, p in moe.named_parameters():
        if n.endswith("e_score_correction_bias"):
            p.copy_(torch.randn(p.shape, device=dev, generator=g) * 0.01)
        else:
            p.copy_(torch.randn(p.shape, device=dev, generator=g) / math.sqrt(p.shape[-1]))
    moe.pack_experts()
    expert_bytes = 3 * cfg.moe_intermediate_size * cfg.hidden_size * 2
    out = {}
    for T in tokens:
        x = torch.randn(T, cfg.hidden_size, device=dev, generator=g).bfloat16()
        ref = moe.forward_reference(x)
        got = moe.forward_grouped(x)
        _, idx = moe.route(x)
        touched = int(torch.unique(idx).numel())
        t_grouped = time_ms(lambda x=x: moe.forward_grouped(x))
        t_ref = time_ms(lambda x=x: moe.forward_reference(x), reps=5) if T <= 8192 else None
        if T * cfg.num_experts_per_token <= moe_ops.SMALL_PAIRS:  # the permuted path instead
            small, moe_ops.SMALL_PAIRS = moe_ops.SMALL_PAIRS, 0
            t_permuted = time_ms(lambda x=x: moe.forward_grouped(x))
            rel_permuted = rel(moe.forward_grouped(x), ref)
            moe_ops.SMALL_PAIRS = small
        else:
            t_permuted, rel_permuted = t_grouped, None
        moved = (touched + 1) * expert_bytes  # chosen experts + the shared one
        out[T] = {
            "rel_err_vs_reference": rel(got, ref),
            "experts_touched": touched,
            "grouped_ms": t_grouped,
            "reference_loop_ms": t_ref,
            "permuted_path_ms": t_permuted,
            "permuted_path_rel_err": rel_permuted,
            "expert_bytes": moved,
            "grouped_gb_per_s": moved / t_grouped / 1e6,
            "grouped_tflops": 2
            * T
            * (cfg.num_experts_per_token + 1)
            * expert_bytes
            / 2
            / t_grouped
            / 1e9,
        }
        print(json.dumps({"moe_layer": T, **out[T]}), flush=True)
    if dev != "cuda":
        return out
    # graph capture of the grouped path: replay on new inputs equals eager
    T = 128
    xs = torch.randn(T, cfg.hidden_size, device=dev, generator=g).bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            moe.forward_grouped(xs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = moe.forward_grouped(xs)
    errs = []
    for _ in range(3):
        xs.copy_(torch.randn(T, cfg.hidden_size, device=dev, generator=g).bfloat16())
        graph.replay()
        errs.append(float((ys.float() - moe.forward_grouped(xs).float()).abs().max()))
    out["graph_replay_max_abs_diff_vs_eager"] = max(errs)
    out["graph_replay_ms"] = time_ms(graph.replay)
    print(json.dumps({"graph": errs, "replay_ms": out["graph_replay_ms"]}), flush=True)
    return out


def engine_tokens(
    model, graphs: bool, prompts: list[list[int]], n: int
) -> tuple[list[list[int]], int]:
    eng = LLMEngine(
        model=model,
        config=EngineConfig(
            model=model.config.name,
            cuda_graphs=graphs,
            max_num_seqs=len(prompts),
            max_num_batched_tokens=4096,
            max_model_len=1024,
            enable_prefix_cache=False,
            num_blocks=len(prompts) * 64 + 8,
        ),
    )
    ids = [
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        for p in prompts
    ]
    done: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = list(o.token_ids)
    return [done[i] for i in ids], eng.runner.num_graph_steps


class RouterProbe:
    """Wraps every ``SparseMoE.route`` of a model (an instance attribute over the method): each
    call keeps its path's own routing (the Triton router on the fused path, torch's on the
    PyTorch path) and records the expert ids and, per token, the gap between the k-th and the
    (k+1)-th biased score. With ``forced`` (expert ids per call, in call order, from another run)
    the call returns those experts instead, weighted by this run's own scores (renormalised and
    scaled as the router does): the two runs then differ only in arithmetic, not in choices."""

    def __init__(self, model, forced: list[torch.Tensor] | None = None) -> None:
        self.moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
        self.forced = forced
        self.ids: list[torch.Tensor] = []
        self.gaps: list[torch.Tensor] = []
        for m in self.moes:
            m.route = functools.partial(self._route, m)

    def _route(self, m: SparseMoE, x: torch.Tensor):
        g = m.gate
        k = m.top_k
        w, idx = moe_ops.route(x, g.weight, g.e_score_correction_bias, k, m.renormalize, m.scaling)
        scores = torch.sigmoid(F.linear(x.float(), g.weight.float()))
        top = (scores + g.e_score_correction_bias.float()).topk(k + 1, dim=-1).values
        n = len(self.ids)
        self.ids.append(idx.cpu())
        self.gaps.append((top[:, k - 1] - top[:, k]).cpu())
        if self.forced is not None:
            idx = self.forced[n].to(x.device)
            w = scores.gather(-1, idx)
            if m.renormalize:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            w = w * m.scaling
        return w, idx

    def remove(self) -> None:
        for m in self.moes:
            del m.route


def probed_logits(model, toks, n_prefill, fla: bool, forced=None):
    probe = RouterProbe(model, forced)
    try:
        logits = forced_logits(model, toks, n_prefill, fla)
    finally:
        probe.remove()
    return logits, probe


def run_prompts(model, prompts, n_prefill: int, fla: bool, forced=None):
    """``probed_logits`` of each prompt: (logits per prompt, one probe holding every prompt's
    router calls in order). ``forced``: a probe of another run over the same prompts."""
    logits, ids, gaps, at = [], [], [], 0
    for toks in prompts:
        mine = None
        if forced is not None:
            mine = forced.ids[at:]
        lg, pr = probed_logits(model, toks, n_prefill, fla, mine)
        at += len(pr.ids)
        logits.append(lg)
        ids += pr.ids
        gaps += pr.gaps
    merged = types.SimpleNamespace(ids=ids, gaps=gaps)
    return logits, merged


def set_precision(model, legacy: bool) -> None:
    """``legacy``: the residual stream in the weights' dtype and bf16 logits (before fp32 ones)."""
    model.residual_dtype = None if legacy else torch.float32
    model.fp32_logits = not legacy


def pooled(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> dict:
    """``compare`` over several prompts: the mean prefill (last-token) rel. error, decode rel.
    errors pooled, argmax agreement over every logit vector (prefill and decode steps) with its
    95% interval."""
    pre, dec, agree, n = [], [], 0, 0
    for x, y in zip(a, b, strict=True):
        errs = [rel(u, v) for u, v in zip(x, y, strict=True)]
        pre.append(errs[0])
        dec += errs[1:]
        agree += sum(int(u.argmax() == v.argmax()) for u, v in zip(x, y, strict=True))
        n += len(x)
    return {
        "prefill_logits_rel_err": sum(pre) / len(pre),
        "decode_logits_rel_err_mean": sum(dec) / len(dec),
        "decode_logits_rel_err_max": max(dec),
        **agreement_ci(agree, n),
    }


def flat(runs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [t for r in runs for t in r]


def routing_agreement(a: RouterProbe, b: RouterProbe, gaps_ref: list[torch.Tensor]) -> dict:
    """Per (call, token): whether the two runs chose the same expert set; the reference run's
    k-th/(k+1)-th gap where they differ, against all gaps."""
    same, flipped_gaps, calls = 0, [], min(len(a.ids), len(b.ids))
    total = 0
    for c in range(calls):
        sa = a.ids[c].sort(-1).values
        sb = b.ids[c].sort(-1).values
        eq = (sa == sb).all(-1)
        same += int(eq.sum())
        total += eq.numel()
        flipped_gaps.append(gaps_ref[c][~eq])
    allg = torch.cat(gaps_ref[:calls]).float()
    fl = torch.cat(flipped_gaps).float() if flipped_gaps else torch.zeros(0)
    return {
        "calls": calls,
        "calls_a_b": [len(a.ids), len(b.ids)],
        "tokens_same_experts": same / max(total, 1),
        "tokens_flipped": total - same,
        "gap_median_all": float(allg.median()),
        "gap_median_flipped": float(fl.median()) if fl.numel() else None,
        "gap_max_flipped": float(fl.max()) if fl.numel() else None,
        "frac_all_gaps_below_max_flipped": float((allg <= fl.max()).float().mean())
        if fl.numel()
        else 0.0,
    }


def margins(a, b, ref) -> dict:
    """Per step: the fp32 reference's top-2 logit margin, and the bf16 noise there (the larger
    of the two bf16 runs' max |logit - reference|); argmax agreement of a and b on the steps
    whose margin exceeds twice that noise (the steps bf16 can decide), and where they disagree."""
    rows, decidable, agree_dec = [], 0, 0
    for x, y, r in zip(a, b, ref, strict=True):
        top = r.topk(2).values
        m = float(top[0] - top[1])
        noise = max(float((x - r).abs().max()), float((y - r).abs().max()))
        same = int(x.argmax() == y.argmax())
        rows.append({"margin": round(m, 4), "noise": round(noise, 4), "agree": same})
        if m > 2 * noise:
            decidable += 1
            agree_dec += same
    disagree = [r for r in rows if not r["agree"]]
    return {
        "steps": len(rows),
        "decidable_steps": decidable,
        "argmax_agree_on_decidable": agree_dec / decidable if decidable else None,
        "disagreeing_steps": disagree,
        "disagreeing_margin_max": max((r["margin"] for r in disagree), default=None),
        "median_margin": sorted(r["margin"] for r in rows)[len(rows) // 2],
        "median_noise": sorted(r["noise"] for r in rows)[len(rows) // 2],
    }


def twin_models_and_prompts(cfg, dev: str, n_prompts: int, length: int):
    """The model with random weights in bf16 (routers and decay parameters fp32, as served), the
    same weights in fp32, and ``n_prompts`` random prompts of ``length`` tokens (seeded)."""
    model = random_model(
        cfg, dev, lambda n, p: torch.float32 if keeps_fp32(n) else torch.bfloat16, seed=0
    )
    model32 = empty_model(cfg, dev, torch.float32)
    with torch.no_grad():
        sd = model.state_dict()
        for k, a in model32.state_dict().items():
            a.copy_(sd[k])
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, cfg.vocab_size, (length,), generator=g).tolist() for _ in range(n_prompts)
    ]
    return model, model32, prompts


def model_check(
    layers: int, n_prefill: int, steps: int, n_prompts: int, preset: str, dev: str
) -> dict:
    """The fused path against the PyTorch path on ``layers`` layers of the geometry (routers in
    fp32, as built for serving), both bf16 and held to the same weights in fp32 (PyTorch path),
    over ``n_prompts`` random prompts of ``n_prefill`` tokens, each followed by ``steps``
    teacher-forced decode steps: logits, argmax, the routers' choices and their margins; then
    again with every run's experts forced to the fp32 run's choices, with the default precision
    (fp32 residual stream and logits) and the legacy one (both in bf16); then CUDA-graph decode
    against eager (first prompt) and the engine's greedy tokens with and without graphs."""
    base = PRESETS[preset]
    cfg = dataclasses.replace(
        base, num_hidden_layers=layers, full_attn_layers=(3,), name=f"kimi-48b-{layers}l"
    )
    model, model32, prompts = twin_models_and_prompts(cfg, dev, n_prompts, n_prefill + steps)
    res: dict = {
        "layers": layers,
        "kinds": cfg.layer_kinds,
        "prompts": n_prompts,
        "prefill": n_prefill,
        "steps": steps,
        "logit_vectors": n_prompts * (steps + 1),
    }
    t0 = time.time()
    ref32, p32 = run_prompts(model32, prompts, n_prefill, False)
    del model32
    torch.cuda.empty_cache() if dev == "cuda" else None
    ref, pt = run_prompts(model, prompts, n_prefill, False)
    fused, pf = run_prompts(model, prompts, n_prefill, True)
    res["fused_vs_torch_path"] = pooled(fused, ref)
    res["fused_bf16_vs_fp32_reference"] = pooled(fused, ref32)
    res["torch_path_bf16_vs_fp32_reference"] = pooled(ref, ref32)
    res["routing_fused_vs_torch_path"] = routing_agreement(pf, pt, p32.gaps)
    res["routing_fused_vs_fp32"] = routing_agreement(pf, p32, p32.gaps)
    res["routing_torch_path_vs_fp32"] = routing_agreement(pt, p32, p32.gaps)
    res["margins_fused_vs_torch_path"] = margins(flat(fused), flat(ref), flat(ref32))
    res["seconds_unforced"] = time.time() - t0
    print(json.dumps(res), flush=True)
    # the same experts everywhere (the fp32 run's): what is left is the kernels' arithmetic
    for legacy in (False, True):
        set_precision(model, legacy)
        ref_f, _ = run_prompts(model, prompts, n_prefill, False, forced=p32)
        fused_f, _ = run_prompts(model, prompts, n_prefill, True, forced=p32)
        key = "forced_routing_legacy_precision" if legacy else "forced_routing"
        res[key] = {
            "fused_vs_torch_path": pooled(fused_f, ref_f),
            "fused_bf16_vs_fp32_reference": pooled(fused_f, ref32),
            "torch_path_bf16_vs_fp32_reference": pooled(ref_f, ref32),
            "margins_fused_vs_torch_path": margins(flat(fused_f), flat(ref_f), flat(ref32)),
        }
        print(json.dumps({key: res[key]}), flush=True)
    set_precision(model, False)
    toks = prompts[0]
    graphs = forced_logits(model, toks, n_prefill, True, graphs=True)
    static = forced_logits(model, toks, n_prefill, True, static=True)
    res["graphs_vs_static_eager"] = compare(graphs, static)
    res["graphs_vs_fused_eager"] = compare(graphs, fused[0])
    print(json.dumps({"graphs_vs_static_eager": res["graphs_vs_static_eager"]}), flush=True)
    eng_prompts = [[(7 * i + 3 * b) % 250 for i in range(100 + 37 * b)] for b in range(4)]
    with torch.inference_mode():
        a, na = engine_tokens(model, True, eng_prompts, 24)
        b, nb = engine_tokens(model, False, eng_prompts, 24)
    res["engine_greedy_graphs_equal_eager"] = a == b
    res["engine_graph_steps"] = na
    res["engine_tokens_graphs_first"] = [t[:8] for t in a]
    res["seconds"] = time.time() - t0
    print(json.dumps({"engine_greedy_graphs_equal_eager": a == b, "graph_steps": na}))
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 32, 128, 1024, 32768])
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=128, help="decode steps per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--preset", default="kimi-linear-48b", help="tiny: a CPU dry run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    res: dict = {"device": name, "torch": torch.__version__, "preset": args.preset}
    if not args.skip_layer:
        res["moe_layer"] = moe_layer_check(args.tokens, args.preset, dev)
        if dev == "cuda":
            torch.cuda.empty_cache()

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))

    save()
    if not args.skip_model:
        res["model"] = model_check(
            args.layers, args.prefill, args.steps, args.prompts, args.preset, dev
        )
    print(json.dumps(res))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
