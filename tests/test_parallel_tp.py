"""Tensor parallelism (tp > 1) in the runtime: equivalence with the single-process reference, and
layouts that cannot be split rejected before any process group exists.

Scenarios run through tests/test_parallel_equivalence.py's worker, reference and checks (same tiny
model, global batch, 3 AdamW steps with active clipping, tolerances: losses, gradient norms and
first-step gradients 1e-5 relative): attention split by heads (MLA with and without the query
latent, GQA with 2 query heads per key/value head), dense and shared-expert SwiGLUs split by
width, and on the MoE side both expert tensor parallelism (etp = tp: each expert's FFN width split)
and TP-extend-EP (experts over ep x tp ranks, each TP rank dispatching its slice of the tokens),
the embedding and output head split over the vocabulary (tied or not; one scenario replicated),
with every dispatcher, data parallelism, ZeRO-1, balance losses and bias updates. With dp = 1 the
micro-batch balance loss is the reference's own, so the world-2 scenarios turn it on.

After the first optimizer step gradients and final parameters are held to 1e-3 instead of the EP
tests' 1e-4: TP splits every attention and MLP matmul into partial sums, which round differently
from the reference, and the reference itself is that sensitive: scaling its initial weights by
(1 + 1e-7 * noise) moves its step-2 gradients by up to 1.5e-4 (AdamW's first updates are close to
lr * sign(gradient), and routing decisions near a tie flip). The first-step gradients, which see
the same parameters as the reference, are the exact check (1e-5).
"""
from __future__ import annotations

import functools

import pytest
import torch

from dist_utils import run_distributed
from config import ConfigError
from moe.config import ModelConfig
from parallel.config import ParallelConfig
from parallel.layout import Layout, take_shard
from parallel.runtime import validate_layout
from test_parallel_equivalence import (BASE_MODEL, GLOBAL_BATCH, SEQ, _rank_worker, build, check_against_reference,
                                       global_batches, reference)

GQA = dict(attention="gqa", num_heads=4, num_kv_heads=2, head_dim=8)
AUX = dict(aux_loss_coeff=1e-2, z_loss_coeff=1e-3)  # micro-batch scope: exact when dp = 1
GROUP_AUX = dict(aux_loss_coeff=1e-2, aux_loss_scope="group")
SEQ_AUX = dict(aux_loss_coeff=1e-2, aux_loss_scope="sequence", z_loss_coeff=1e-3)
BIAS = dict(expert_bias=True, bias_update_speed=0.05, score_func="sigmoid")
EXT = dict(tp=2, tp_extend_ep=True)
TOL_AFTER_UPDATE_TP = 1e-3
# World 4, 2 data-parallel ranks in each EP group: expert TP (EP group = one TP index of each) and
# TP-extend-EP (EP group = both TP ranks of each, whose routers counted the same tokens).
COUNT_LAYOUTS = [dict(tp=2, ep=2), dict(EXT, ep=2)]

# (id, world, parallel overrides, model overrides)
SCENARIOS = [
    ("w2-tp2-etp-local-mla", 2, dict(tp=2, dispatcher="local"), AUX),
    ("w2-tp2-etp-local-gqa-zero1", 2, dict(tp=2, dispatcher="local", zero1=True), {**GQA, **AUX}),
    # the embedding and head replicated (vocab_parallel: false), and a tied embedding split over the vocabulary
    ("w2-tp2-etp-local-replicated-vocab", 2, dict(tp=2, dispatcher="local", vocab_parallel=False), AUX),
    ("w2-tp2-extend-alltoall-tied", 2, dict(EXT, dispatcher="alltoall"), {**AUX, "tie_embeddings": True}),
    ("w2-tp2-extend-alltoall-mla-noqlora", 2, dict(EXT, dispatcher="alltoall"), {**AUX, "q_lora_rank": 0}),
    ("w4-tp2xdp2-etp-local-zero1", 4, dict(tp=2, dispatcher="local", zero1=True), {}),
    ("w4-tp2xep2-etp-alltoall", 4, dict(tp=2, ep=2, dispatcher="alltoall"), {}),
    ("w4-tp2xep2-etp-allgather-gqa-group-aux", 4, dict(tp=2, ep=2, dispatcher="allgather"), {**GQA, **GROUP_AUX}),
    ("w4-tp2xep2-extend-alltoall-zero1", 4, dict(EXT, ep=2, dispatcher="alltoall", zero1=True), {}),
    ("w4-tp2xep2-extend-allgather-group-aux", 4, dict(EXT, ep=2, dispatcher="allgather"), GROUP_AUX),
    ("w4-tp2xep2-extend-hier-2x2-gqa", 4, dict(EXT, ep=2, dispatcher="hierarchical", devices_per_node=2), GQA),
    ("w4-tp2xdp2-extend-alltoall-bias", 4, dict(EXT, ep=1, dispatcher="alltoall"), BIAS),
    # sequence parallelism: norms, residual and routing on S / tp positions per rank
    ("w2-tp2-etp-local-sp", 2, dict(tp=2, dispatcher="local", sequence_parallel=True), AUX),
    ("w2-tp2-extend-alltoall-sp-seq-aux-gqa", 2, dict(EXT, dispatcher="alltoall", sequence_parallel=True),
     {**GQA, **SEQ_AUX}),
    ("w4-tp2xep2-etp-alltoall-sp-zero1", 4, dict(tp=2, ep=2, dispatcher="alltoall", zero1=True, sequence_parallel=True),
     SEQ_AUX),
    ("w4-tp2xep2-extend-allgather-sp-group-aux", 4, dict(EXT, ep=2, dispatcher="allgather", sequence_parallel=True),
     GROUP_AUX),
    ("w4-tp2xep2-extend-hier-2x2-sp", 4, dict(EXT, ep=2, dispatcher="hierarchical", devices_per_node=2,
                                              sequence_parallel=True), dict(z_loss_coeff=1e-3)),
    ("w4-tp2xdp2-extend-alltoall-sp-bias", 4, dict(EXT, ep=1, dispatcher="alltoall", sequence_parallel=True), BIAS),
    ("w4-tp2xdp2-etp-local-sp-bias-tied", 4, dict(tp=2, dispatcher="local", sequence_parallel=True),
     {**BIAS, "tie_embeddings": True}),
    # tp outermost (parallel.rank_order): TP groups {0, 2} and {1, 3}, EP peers neighbours
    ("w4-tp2xep2-etp-alltoall-tp-outer-zero1", 4, dict(tp=2, ep=2, dispatcher="alltoall", zero1=True,
                                                       rank_order="dp-cp-tp"), GROUP_AUX),
    ("w4-tp2xep2-etp-allgather-tp-outer", 4, dict(tp=2, ep=2, dispatcher="allgather", rank_order="dp-cp-tp"), {}),
]


def _probe(par: dict) -> tuple[torch.Tensor, int]:
    """What the router's stats_reducer makes of a count of 1 per expert on every rank, and the token
    copies the step metrics report for one forward pass over the global batch."""
    from parallel.runtime import ParallelRuntime
    model = build({})
    rt = ParallelRuntime.setup(ParallelConfig(**par), model.cfg)
    rt.parallelize(model)
    counts = model.moe_layers()[0].router.stats_reducer(torch.ones(model.cfg.num_experts))
    b = GLOBAL_BATCH // rt.dp_size
    tokens = global_batches()[0][rt.dp_rank * b:(rt.dp_rank + 1) * b]
    model(tokens[:, :-1], tokens[:, 1:])
    return counts, sum(rt.step_metrics()["tokens_per_ep_rank"])


def _worker(scenarios: list) -> tuple[list, list]:
    probes = [_probe(par) for par in COUNT_LAYOUTS] if scenarios[0][1] == 4 else []
    return _rank_worker(scenarios), probes


@functools.lru_cache(maxsize=None)
def world_results(world: int) -> tuple[dict, list]:
    chosen = [s for s in SCENARIOS if s[1] == world]
    per_rank = run_distributed(_worker, world, chosen, timeout=240)
    results = {s[0]: [per_rank[r][0][i] for r in range(world)] for i, s in enumerate(chosen)}
    return results, [probes for _, probes in per_rank]


def _held_slice(ref: torch.Tensor, out: dict, name: str) -> torch.Tensor:
    return take_shard(ref, out["shards"].get(name, ()))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sid, world, par, model_overrides", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_tp_matches_single_process(sid, world, par, model_overrides):
    ref = reference(tuple(sorted(model_overrides.items())))
    ranks = world_results(world)[0][sid]
    worst = check_against_reference(ranks, ref, _held_slice, TOL_AFTER_UPDATE_TP)
    cfg = ModelConfig(**{**BASE_MODEL, **model_overrides})
    params = ranks[0]["params"]
    # The splits really happened: attention by heads, dense MLP by width, experts by width or count.
    attn = cfg.num_heads * (cfg.v_head_dim if cfg.attention == "mla" else cfg.head_dim)
    assert params["layers.0.attn.wo.weight"].shape == (cfg.hidden_size, attn // 2)
    assert params["layers.0.mlp.w1.weight"].shape == (cfg.dense_ffn_size // 2, cfg.hidden_size)
    vocab = cfg.vocab_size // (1 if par.get("vocab_parallel") is False else 2)
    assert params["embed.weight"].shape == (vocab, cfg.hidden_size)
    if not cfg.tie_embeddings:
        assert params["head.weight"].shape == (vocab, cfg.hidden_size)
    w1 = params["layers.1.mlp.experts.w1_EDF"]
    if par.get("tp_extend_ep"):
        assert w1.shape == (cfg.num_experts // (2 * par.get("ep", 1)), cfg.hidden_size, cfg.expert_ffn_size)
    else:
        assert w1.shape == (cfg.num_experts // par.get("ep", 1), cfg.hidden_size, cfg.expert_ffn_size // 2)
    # Replicated parameters stay bitwise identical on the TP ranks of one data-parallel rank.
    for a in ranks:
        for b in ranks:
            if a is not b and a["dp_rank"] == b["dp_rank"]:
                for name in a["params"]:
                    if name not in a["shards"]:
                        assert torch.equal(a["params"][name], b["params"][name]), f"{name} drifted across TP ranks"
    if model_overrides.get("expert_bias"):
        assert any(b.abs().sum() > 0 for b in ref["bias"]), "bias updates must have happened"
    if par.get("zero1") and world // 2 > 1:  # optimizer state divided over the dp replicas
        held = sum(2 * p.numel() for p in params.values())
        assert max(o["state_numel"] for o in ranks) < 0.75 * held
    print(f"{sid}: max relative difference: loss {worst['loss']:.1e}, first-step grads {worst['grad0']:.1e}, "
          f"later grads {worst['grad']:.1e}, final params {worst['param']:.1e}")


def test_counts_are_global_batch_counts():
    """Balance statistics and bias updates read per-expert counts summed over the EP group, and the
    step metrics count token copies per EP rank: under TP every data-parallel rank's tokens must
    count once, though tp ranks routed them (and with expert TP, tp ranks received each copy)."""
    cfg = ModelConfig(**BASE_MODEL)
    copies = GLOBAL_BATCH * cfg.top_k * (cfg.num_moe_layers * SEQ + cfg.mtp_layers * (SEQ - 1))  # dropless
    for rank_probes in world_results(4)[1]:
        for counts, received in rank_probes:
            assert torch.equal(counts, torch.full_like(counts, 2.0)), counts
            assert received == copies


def test_tp_groups():
    etp = Layout.build(ParallelConfig(tp=2, ep=2), 4, ModelConfig())
    assert (etp.dp, etp.ep, etp.etp, etp.edp) == (2, 2, 2, 1)
    assert etp.dp_groups() == [[0, 2], [1, 3]]
    assert etp.ep_groups() == [[0, 2], [1, 3]]  # the same TP index of each data-parallel rank
    ext = Layout.build(ParallelConfig(tp=2, ep=2, tp_extend_ep=True), 4, ModelConfig())
    assert (ext.ep, ext.etp, ext.edp) == (4, 1, 1)
    assert ext.ep_groups() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("par, world, model, message", [
    (dict(tp=4), 4, dict(num_heads=6), "parallel.tp: model.num_heads=6 is not divisible by tp=4; choose tp among "
                                       "1, 2, 3, 6"),
    (dict(tp=4), 4, dict(attention="gqa", num_heads=8, num_kv_heads=2),
     "parallel.tp: model.num_kv_heads=2 is not divisible by tp=4; choose tp among 1, 2"),
    (dict(tp=4), 4, dict(dense_ffn_size=66), "parallel.tp: model.dense_ffn_size=66 is not divisible by tp=4"),
    (dict(tp=4, tp_extend_ep=True), 4, dict(expert_ffn_size=18),
     "parallel.tp: the shared experts' width model.num_shared_experts*expert_ffn_size=18 is not divisible by tp=4"),
    (dict(tp=4), 4, dict(expert_ffn_size=18, num_shared_experts=0),
     "parallel.tp: model.expert_ffn_size=18 is not divisible by tp=4; choose tp among 1, 2, 3, 6, 9, 18, or set "
     "tp_extend_ep: true"),
    (dict(tp=4), 4, dict(vocab_size=1002), "parallel.tp: model.vocab_size=1002 is not divisible by tp=4; choose tp "
     "among 1, 2, 3, 6, 167, 334, 501, 1002, pad the vocabulary to a multiple of tp, or set vocab_parallel: false"),
    (dict(tp=2, ep=2), 2, dict(), "parallel.ep: ep = 2 does not divide the 2 ranks of a pipeline stage"),
    (dict(tp=2, ep=2, dispatcher="hierarchical"), 4, dict(), "parallel.dispatcher: 'hierarchical' needs contiguous EP"),
    (dict(pp=2, tp=2), 4, dict(num_layers=3), "parallel.pp: 3 layers (model.num_layers=3 + model.noop_layers=0) "
                                              "do not split into pp*vpp=2 equal stages"),
])
def test_bad_tp_layout_is_one_clear_error(par, world, model, message):
    with pytest.raises(ConfigError) as e:
        validate_layout(ParallelConfig(**par), ModelConfig(**model), world)
    assert str(e.value).startswith(message), str(e.value)


def test_replicated_vocabulary_needs_no_divisible_vocab_size():
    validate_layout(ParallelConfig(tp=4, vocab_parallel=False), ModelConfig(vocab_size=1002), 4)
