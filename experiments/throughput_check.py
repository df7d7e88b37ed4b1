"""The correctness check of experiments/throughput.py: generated tokens and logits against the float64
single-process reference (tw/model/reference.py next_logits / generate) for the first --check-requests
requests. CPU (float32): every strategy but nocomm must generate exactly the reference's tokens and its
logits within tolerance; GPU (bf16): the logits of the first and the last output step within tolerance
(check_logits_rel_err; greedy tokens may legitimately differ after a near tie in bf16).
"""
from __future__ import annotations

import numpy as np

from tw.runtime import dist
from tw.serve import lm_head
from tw.model import reference
from tw.runtime.arrays import to_host


def references(args, world, cfg, model, load) -> dict:
    """Rank 0's float64 reference for the checked requests, broadcast: per request id, the logits of
    its first output token and (CPU only: O(n^2) recomputation) its greedy tokens. MoE models: none
    here; check() computes both per run, following that run's routing at near-ties (without it a
    bf16 near-tie router gap is refused, tw/reference.RouterNearTie)."""
    out = None
    if cfg.num_experts:
        out = {r.rid: {"first": None, "tokens": None} for r in load.requests[:args.check_requests]}
    elif world.rank == 0:
        xp, w = model.xp, lm_head.full_weight(cfg, args.seed, model.xp).astype(model.dtype)
        out = {}
        for r in load.requests[:args.check_requests]:
            first = reference.next_logits(cfg, r.prompt, args.seed, xp, model.dtype, w)
            toks = (None if world.is_gpu else
                    reference.generate(cfg, r.prompt, r.output_len, args.seed, xp, model.dtype, w))
            out[r.rid] = {"first": to_host(first), "tokens": toks}
    return world.comm.bcast(out, root=0)


def check(args, world, cfg, model, refs, sched, logits, routing=None) -> dict:
    """Compare one strategy's run with the reference: tokens (CPU), logits of the first output step and
    of the last one (that given the strategy's own earlier tokens). MoE: `routing` (rid -> {layer:
    experts per position}, what the engine chose) lets the reference follow the run at near-tie
    routings (tw/reference.forward), so both logits references and (CPU) the greedy tokens are
    computed for this run."""
    tol = reference.tolerance(model.dtype)
    errs, equal, first_equal = [], [], []
    done = {r.rid: r for r in sched.finished}
    routed = bool(cfg.num_experts and routing)
    if cfg.num_experts and refs and not routed:
        raise RuntimeError(f"{cfg.name}: the MoE check needs the run's routing (serve() records it for the checked "
                           "requests), and none was recorded")
    ours = None
    if world.rank == 0:
        xp, w = model.xp, lm_head.full_weight(cfg, args.seed, model.xp).astype(model.dtype)

        def logits_after(rid, n_out):   # the reference's logits after the prompt and n_out outputs
            r = done[rid]
            ids = np.concatenate([r.prompt, r.output[:n_out]]).astype(np.int32)
            follow = {layer: a[:len(ids)] for layer, a in routing[rid].items()} if routed else None
            return to_host(reference.next_logits(cfg, ids, args.seed, xp, model.dtype, w, follow))

        def tokens(rid):        # CPU, MoE: the greedy reference along this run's routing
            r = done[rid]
            return reference.generate(cfg, r.prompt, r.output_len, args.seed, xp, model.dtype, w, routing[rid])

        ours = {rid: {"first": logits_after(rid, 0) if routed else None,
                      "last": logits_after(rid, done[rid].output_len - 1) if done[rid].output_len > 1 else None,
                      "tokens": tokens(rid) if routed and not world.is_gpu else None}
                for rid in refs}
    ours = world.comm.bcast(ours, root=0)
    for rid, ref in refs.items():
        r, got = done[rid], logits.get(rid, [])
        first = ours[rid]["first"] if ours[rid]["first"] is not None else ref["first"]
        want = [first] + ([ours[rid]["last"]] if ours[rid]["last"] is not None else [])
        errs += [reference.rel_err(g, w_)["rel_err"] for g, w_ in zip(got, want)]
        errs += [float("inf")] * (len(want) - len(got))      # a captured step missing is a failure
        first_equal.append(r.output[0] == int(np.argmax(first)))
        want_tokens = ref["tokens"] if ref["tokens"] is not None else ours[rid]["tokens"]
        if want_tokens is not None:
            equal.append(r.output == want_tokens)
    row = {"check_requests": len(refs), "check_logits_rel_err": max(errs), "check_tolerance": tol,
           "check_first_token_equal": all(first_equal), "check_tokens_equal": all(equal) if equal else None}
    row["correct"] = bool(row["check_logits_rel_err"] <= tol and row["check_tokens_equal"] is not False)
    return row


def check_refs(args, world, cfg, model, load) -> dict:
    if not (args.check and args.check_requests):
        return {}
    world.print0(f"float64 reference for {min(args.check_requests, len(load.requests))} requests "
                 "(rank 0, then broadcast) ...")
    with dist.step(f"float64 reference, {load.name}"):
        return references(args, world, cfg, model, load)
