"""The simulator's cost-model parts on cases computed by hand: collective bytes, operator times,
pipeline schedules and bubbles, activation and model-state memory, layout rules."""
import json
from dataclasses import replace

import pytest

from moe import accounting as acc
from config import ConfigError, from_dict
from moe.config import ModelConfig
from simulator import comm as C
from parallel.memory_config import MemoryConfig
from simulator import memory as M
from simulator.compute import ComputeModel
from parallel.layout import noop_placement
from simulator.cost import SimOptions, Simulator
from simulator.hardware import HardwareProfile, Link, MatmulEfficiency
from simulator.layout import Layout, derive
from simulator.schedule import bubble_fraction, in_flight_per_chunk, pipeline_time, rank_ops, simulate

# Same tiny model as tests/test_accounting.py: D=8, vocab 10, MLA H=2 (q_lora 4, kv_lora 6, nope 3,
# rope 2, v 5), dense FFN 12, 4 experts top-2 of FFN 3, 2 shared experts, sandwich norm.
TINY = dict(vocab_size=10, hidden_size=8, num_layers=3, first_k_dense=1, attention="mla", num_heads=2,
            q_lora_rank=4, kv_lora_rank=6, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=5,
            dense_ffn_size=12, num_experts=4, top_k=2, expert_ffn_size=3, num_shared_experts=2,
            norm="sandwich", mtp_layers=0, max_seq_len=64)


def tiny(**over) -> ModelConfig:
    return from_dict(ModelConfig, {**TINY, **over})


def profile(**over) -> HardwareProfile:
    base = dict(name="test", device="npu", peak_tflops={"bf16": 1.0}, memory_gb=16.0, memory_bandwidth_gbps=1000.0,
                devices_per_node=4, intra_node=Link(100.0, 10.0), inter_node=Link(10.0, 20.0),
                host_link=Link(10.0, 0.0), matmul=MatmulEfficiency(0.5, 0.0, 1.0), op_overhead_us=0.0,
                reserved_memory_gb=1.0)
    return HardwareProfile(**{**base, **over})


# ---------------------------------------------------------------------------------------------
# collectives


def test_ring_collective_bytes():
    ag = C.all_gather(1000, 4, 1, 8)
    assert (ag.intra_bytes, ag.inter_bytes, ag.steps, ag.spans_nodes) == (750, 0, 3, False)
    ar = C.all_reduce(1000, 4, 1, 8)
    assert (ar.intra_bytes, ar.steps) == (1500, 6)
    # 4 members 4 ranks apart with 8 per node: 2 nodes, so the ring runs at the inter-node rate
    rs = C.reduce_scatter(1000, 4, 4, 8)
    assert (rs.intra_bytes, rs.inter_bytes, rs.spans_nodes) == (0, 750, True)
    assert C.all_gather(1000, 1, 1, 8).bytes == 0


def test_all_to_all_bytes_split_by_link():
    # 8 members, 4 per node: of the 800 bytes a rank holds, 100 stay home, 300 go to its 3 node
    # peers, 400 to the 4 members on the other node; 3 latency steps (log2 8)
    a2a = C.all_to_all(800, 8, 1, 4)
    assert (a2a.intra_bytes, a2a.inter_bytes, a2a.steps, a2a.spans_nodes) == (300, 400, 3, True)


def test_ep_dispatch_bytes_of_each_dispatcher():
    # 10 tokens, top-2, 100-byte hidden vectors; routing travels as int64 ids (16 bytes per token)
    # and fp32 weights (8 bytes per token), each a message of its own
    # every exchange with split sizes starts with a count exchange: one latency step, no bytes
    counts, flat = C.ep_dispatch("alltoall", 10, 2, 100, 4, 1, 8, imbalance=1.5)
    assert (counts.bytes, counts.steps) == (0, 1)
    assert flat.intra_bytes == pytest.approx(2000 * 3 / 4 * 1.5)
    _, x, ids, w = C.ep_dispatch("allgather", 10, 2, 100, 4, 1, 8)
    assert [m.intra_bytes for m in (x, ids, w)] == pytest.approx([4 * 10 * b * 3 / 4 for b in (100, 16, 8)])
    assert {m.kind for m in (x, ids, w)} == {"all_gather"}
    # EP 8 over 2 nodes of 4: each token (100 + 16 + 8 bytes in three messages) crosses to the
    # other node once, then an all-to-all of the 2000 copy-bytes among the 4 local ranks
    _, x, ids, w, _, intra = C.ep_dispatch("hierarchical", 10, 2, 100, 8, 1, 4)
    assert [m.inter_bytes for m in (x, ids, w)] == pytest.approx([1000, 160, 80])
    assert x.intra_bytes == 0
    assert (intra.intra_bytes, intra.inter_bytes) == (pytest.approx(1500), 0)
    # knowing the experts (16 over 2 nodes, top-2), a token needs the other node unless both its
    # experts are local: 1 - C(8,2)/C(16,2) = 1 - 28/120
    _, x, _, _, _, _ = C.ep_dispatch("hierarchical", 10, 2, 100, 8, 1, 4, num_experts=16)
    assert x.inter_bytes == pytest.approx(10 * 100 * (1 - 28 / 120))
    assert C.node_need(8, 2, 2) == pytest.approx(1 - 6 / 28)
    # inside one node hierarchical is the flat all-to-all
    assert C.ep_dispatch("hierarchical", 10, 2, 100, 4, 1, 8) == C.ep_dispatch("alltoall", 10, 2, 100, 4, 1, 8)
    assert C.ep_dispatch("alltoall", 10, 2, 100, 1, 1, 8) == []


def test_ep_combine_returns_hidden_vectors_only():
    # all-to-all: the copies back, no count exchange
    (back,) = C.ep_combine("alltoall", 10, 2, 100, 4, 1, 8, imbalance=1.5)
    assert (back.kind, back.intra_bytes) == ("all_to_all", pytest.approx(2000 * 3 / 4 * 1.5))
    # all-gather: a reduce-scatter of the partial sums of all 4 x 10 gathered tokens
    (rs,) = C.ep_combine("allgather", 10, 2, 100, 4, 1, 8)
    assert (rs.kind, rs.intra_bytes, rs.steps) == ("reduce_scatter", pytest.approx(4000 * 3 / 4), 3)
    # hierarchical over 2 nodes of 4: intra-node all-to-all back, then one partial sum per token
    intra, inter = C.ep_combine("hierarchical", 10, 2, 100, 8, 1, 4)
    assert (intra.intra_bytes, inter.inter_bytes) == (pytest.approx(1500), pytest.approx(1000))
    assert C.ep_combine("local", 10, 2, 100, 4, 1, 8) == []


def test_comm_time():
    hw = profile()
    t = C.Comm("x", 1e9, 0.0, 2, False).time(hw)
    assert t == pytest.approx(1e9 / 100e9 + 2 * 10e-6)
    # both links at once: the slower sets the time; spanning nodes uses the inter-node latency
    t = C.Comm("x", 1e9, 1e9, 1, True).time(hw)
    assert t == pytest.approx(1e9 / 10e9 + 20e-6)


# ---------------------------------------------------------------------------------------------
# operators


def test_gemm_and_eltwise_times_by_hand():
    cm = ComputeModel(tiny(), profile(), "bf16")
    op = cm.gemm("x", 100, 200, 300)
    # 2*100*200*300 FLOPs at 1 TFLOP/s * 0.5 efficiency; memory traffic is far below the roofline
    assert op.flops == 1.2e7
    assert op.fwd == pytest.approx(1.2e7 / 0.5e12)
    assert op.bwd == pytest.approx(2 * 1.2e7 / 0.5e12)
    # with 100 GB/s memory, (1 x 1000) @ (1000 x 1000) is memory-bound: 2*(1000 + 1e6 + 1000) bytes
    slow = ComputeModel(tiny(), profile(memory_bandwidth_gbps=100.0), "bf16")
    assert slow.gemm("y", 1, 1000, 1000).fwd == pytest.approx(2 * (1000 + 1e6 + 1000) / 1e11)
    # a norm over 1000 elements: 2 passes of 2 bytes at 1 TB/s, backward twice that
    norm = cm.eltwise("n", "norm", 1000)
    assert (norm.fwd, norm.bwd) == (pytest.approx(4000 / 1e12), pytest.approx(8000 / 1e12))
    calibrated = ComputeModel(tiny(), profile(op_costs={"norm": [3.0, 2.0]}), "bf16")
    n2 = calibrated.eltwise("n", "norm", 1000)
    assert n2.fwd + n2.bwd == pytest.approx(3e-6 + 2e-9 * 1000)


def test_layer_flops_match_accounting():
    """The simulator charges exactly the FLOPs the trainer's MFU counts (one definition)."""
    cfg, S, B = tiny(), 16, 2
    cm = ComputeModel(cfg, profile(), "bf16")
    T = B * S
    attn = cm.attention(T, S, tp=1)
    moe = cm.moe_ffn(T, tp=1, ep=1, etp=1, imbalance=1.0)
    dense = cm.dense_ffn(T, tp=1)
    attn_flops = sum(o.flops for o in attn)
    assert attn_flops == pytest.approx(T * (acc.attention_proj_flops(cfg) + acc.core_attention_flops(cfg, S)))
    assert sum(o.flops for o in moe) == pytest.approx(
        T * (acc.router_flops(cfg) + acc.routed_expert_flops(cfg) + acc.shared_expert_flops(cfg)))
    assert sum(o.flops for o in dense) == pytest.approx(T * acc.dense_mlp_flops(cfg))
    assert sum(o.flops for o in cm.head(T, 1)) == pytest.approx(T * acc.output_head_flops(cfg))


# ---------------------------------------------------------------------------------------------
# pipeline schedules


def _uniform(p, v, m, f=1.0, b=2.0, p2p=0.0):
    return simulate(p, v, m, lambda r, c, ph: f / v, lambda r, c, ph: b / v, p2p=p2p)


def test_1f1b_bubble_by_hand():
    tl = _uniform(4, 1, 8)
    assert tl.makespan == pytest.approx((8 + 3) * 3.0)  # (m + p - 1)(F + B)
    busy = 8 * 3.0
    assert 1 - busy / tl.makespan == pytest.approx(3 / 11) == pytest.approx(bubble_fraction(4, 8))
    assert pipeline_time([3.0] * 4, 8, 1) == pytest.approx(33.0)


def test_interleaved_bubble_by_hand():
    tl = _uniform(4, 2, 8)  # chunks of F=0.5, B=1
    assert tl.makespan == pytest.approx(8 * 3.0 + 3 * 3.0 / 2)  # m(F+B) + (p-1)(F+B)/v
    assert 1 - 24.0 / tl.makespan == pytest.approx(3 / 19) == pytest.approx(bubble_fraction(4, 8, 2))
    assert pipeline_time([3.0] * 4, 8, 2) == pytest.approx(28.5)


def test_schedule_order_and_in_flight():
    # rank 0 of 1F1B with p=2, m=3: one warm-up forward, then F/B pairs, then the last backward
    assert [(k, mb) for k, mb, _, _ in rank_ops(2, 1, 3, 0)] == [("F", 0), ("F", 1), ("B", 0), ("F", 2),
                                                                  ("B", 1), ("B", 2)]
    assert [sum(in_flight_per_chunk(4, 1, 8, r)) for r in range(4)] == [4, 3, 2, 1]
    # interleaved rank 0: (p-1)*2 + (v-1)*p warm-up chunks + 1 = 11, spread 4 + 4 + 3 over... chunks
    assert in_flight_per_chunk(4, 2, 8, 0) == [7, 4]
    tl = simulate(4, 2, 8, lambda r, c, ph: 1.0, lambda r, c, ph: 2.0)
    assert tl.peak_live[0] == 11 and tl.peak_live[3] == 5


def test_p2p_delay_by_hand():
    # p=2, m=2, F=B=1, hand-offs 0.5: rank1 F0 1.5-2.5, B0 -3.5, F1 3.5-4.5, B1 -5.5;
    # rank0 B0 4-5, B1 6-7
    tl = _uniform(2, 1, 2, f=1.0, b=1.0, p2p=0.5)
    assert tl.makespan == pytest.approx(7.0)
    assert tl.finish == [pytest.approx(7.0), pytest.approx(5.5)]


def test_chrome_trace(tmp_path):
    tl = _uniform(2, 1, 2)
    data = json.loads(tl.to_chrome_trace(tmp_path / "t.json").read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 8 and {e["pid"] for e in spans} == {0, 1}


# ---------------------------------------------------------------------------------------------
# memory


def _per_token(saved, **policy):
    return M.saved_bytes_per_token(saved, 2, MemoryConfig(**policy), whole="layer" in policy.get("recompute", []))


SELECTIVE = dict(recompute=["norm", "swiglu", "mla_up"])


def test_activation_bytes_per_policy_by_hand():
    cfg = tiny()
    dense = M.layer_saved(cfg, "dense", tp=1, etp=1, imbalance=1.0)
    # attention (fused kernels), bf16 values: in 8, normed 8, q latent 4 + normed 4, kv latent 6 +
    # its rope part 2 + normed 6, kernel q 2*5, k 10, v 10 (+ the k_nope half of v's storage 6),
    # kernel output 10, output projection input 10, post-norm input 8 -> 102 values = 204 bytes;
    # fp32: four 1/rms (16) and the log-sum-exp of 2 heads (8) -> 228 bytes.
    # MLP: in 8, normed 8, w1 12, w3 12, product 12, post-norm input 8 = 60 values + two 1/rms -> 128
    assert _per_token(dense) == (356, 0)
    # selective: the norms' 1/rms (6 x 4), mla_up's region (normed latents 10, q/k/v and storage 36,
    # kernel output 10, lse 8 bytes) and swiglu's product 12 -> 68 values and 32 bytes
    assert _per_token(dense, **SELECTIVE) == (356 - 136 - 32, 0)
    assert _per_token(dense, recompute=["layer"]) == (16, 0)  # the layer input only
    # swap attention: what MLA.forward saves (normed input, latents, q/k/v, kernel output and lse,
    # output projection input) leaves: 78 values + 8 bytes; the storage rest parts (k_rope 2,
    # k_nope 6) leave with their views but are not copied
    assert _per_token(dense, swap=["attention"]) == (356 - 164 - 16, 164)
    moe = M.layer_saved(cfg, "moe", tp=1, etp=1, imbalance=1.0)
    # MoE part: in 8 + normed 8, expert input 2*8, expert w1/w3/product 3 * 2*3, rows back 2*8,
    # shared w1/w3/product 3 * 6, post-norm input 8 -> 92 values = 184 bytes; plus fp32 router
    # scores 4 x 4, top-k ids 2 x 8 and weights 2 x 4, the permute and unpermute indices 2 x 16,
    # the unpermute weights 8, two 1/rms 8 -> 272 bytes
    assert _per_token(moe) == (228 + 272, 0)
    # swapping the shared expert (`mlp`) copies its input too, which the router keeps on the device
    assert _per_token(moe, swap=["mlp"]) == (500 - 36, 36 + 16)


def test_reference_path_saves_more():
    cfg = tiny()
    fused = M.layer_saved(cfg, "dense", tp=1, etp=1, imbalance=1.0, fused=True, seq_len=16)
    ref = M.layer_saved(cfg, "dense", tp=1, etp=1, imbalance=1.0, fused=False, seq_len=16)
    # unscaled norm inputs 8+4+6+8+8+8, SiLU output 12; attention copies q/k/v 30 and probabilities
    # 2 heads x 16 positions instead of the kernel's v storage rest 6, output 10 and lse (8 bytes)
    assert _per_token(ref)[0] - _per_token(fused)[0] == 2 * (42 + 12 + 62 - 46) - 8
    # core_attention recompute on the reference path keeps its inputs q, k, v (+ storage rest)
    assert _per_token(ref)[0] - _per_token(ref, recompute=["core_attention"])[0] == 2 * (62 - 36)


def test_sequence_parallel_shards_hidden_sized_activations():
    cfg = tiny()
    with_sp = _per_token(M.layer_saved(cfg, "dense", tp=2, etp=1, imbalance=1.0))[0]
    without = _per_token(M.layer_saved(cfg, "dense", tp=2, etp=1, imbalance=1.0, sp=1))[0]
    # six hidden-sized tensors (attention and MLP inputs, normed copies, post-norm inputs) of D=8:
    # 4 bf16 values each per rank with sequence parallelism over 2 ranks, 8 without; and the four
    # hidden norms' fp32 1/rms for half the tokens
    assert without - with_sp == 6 * (8 - 4) * 2 + 4 * 0.5 * 4


def test_model_states_by_hand():
    st = M.state_bytes(dense=100, expert=40, dtype_bytes=2, dense_dp=4, expert_dp=2, zero1=True, offload=False)
    assert (st.weights, st.grads, st.optimizer) == (280, 560, 12 * (100 / 4 + 40 / 2))
    assert M.state_bytes(100, 40, 2, 4, 2, zero1=False, offload=False).optimizer == 12 * 140
    off = M.state_bytes(100, 40, 2, 4, 2, zero1=True, offload=True)
    # offload: this rank's shard of fp32 masters + both moments on the host, nothing on the device
    assert (off.optimizer, off.optimizer_host) == (0, 12 * (100 / 4 + 40 / 2))
    assert M.state_bytes(100, 40, 4, 4, 2, zero1=False, offload=True).optimizer_host == 12 * 140  # fp32 too
    assert M.state_bytes(100, 40, 4, 4, 2, zero1=False, offload=False).optimizer == 8 * 140  # fp32: no master


def test_simulator_memory_of_a_tiny_model_by_hand():
    cfg = tiny(num_layers=2)  # one dense + one MoE layer, no MTP
    sim = Simulator(cfg, profile(), 1, SimOptions(dtype="bf16"))
    lay = Layout(micro_batch_size=2, global_batch_size=2, seq_len=16, dispatcher="local")
    est = sim.estimate(lay)
    T = 32
    # final norm in/out (bf16) + its fp32 1/rms + fp32 log-probabilities + int64 labels
    head = 2 * 8 * 2 + 4 + 4 * 10 + 8
    assert est.memory["activations"] == pytest.approx(T * (356 + 500 + head))  # the layers as above
    assert est.memory["transient"] == pytest.approx(4 * T * 10)  # logits gradient
    n = acc.param_counts(cfg).total
    assert est.memory["weights"] == pytest.approx(2 * n)
    assert est.memory["grads"] == pytest.approx(4 * n)
    # two pipeline stages of one dense layer each: rank 0 holds two micro-batches in flight under
    # 1F1B (2 x 356 bytes a token), rank 1 one (356 + the head's 84, + the logits' gradient)
    sim2 = Simulator(tiny(num_layers=2, first_k_dense=2), profile(), 2, SimOptions(dtype="bf16"))
    est2 = sim2.estimate(Layout(pp=2, micro_batch_size=2, global_batch_size=4, seq_len=16, dispatcher="local"))
    assert est2.stage_memory[0] > est2.stage_memory[1]


def test_noop_placement_balances_head_and_embedding():
    assert noop_placement(4, 1, 2, 3) == [1, 0, 0, 2]  # last rank first, then the first rank
    assert noop_placement(2, 2, 2, 3) == [0, 1, 0, 2]  # chunks of the last rank, latest first
    assert noop_placement(4, 1, 2, 0) == [0, 0, 0, 0]


@pytest.mark.parametrize("num_layers, par, heavier", [
    (8, dict(pp_stage_layers=[6, 2]), 0),  # 4 + 4 by default
    (8, dict(pp_stage_layers=[1, 7]), 1),
    (8, dict(vpp=2, pp_stage_layers=[3, 1, 2, 2]), 0),  # rank 0 holds stages 0 and 2: 5 layers, rank 1 3
    (7, dict(vpp=2), None),  # no list: one padded no-op layer, placed as the runtime places it
])
def test_simulator_stages_are_the_runtimes(num_layers, par, heavier):
    """The simulator costs the stages the trainer builds: per virtual stage, its dense, MoE and no-op
    layer counts equal those of the runtime's `stage_plan`, explicit `pp_stage_layers` included, and
    an uneven list moves busy time onto the pipeline rank that got the extra layers."""
    from parallel.config import ParallelConfig
    from parallel.pipeline_layout import stage_plan
    model = tiny(num_layers=num_layers, first_k_dense=1)
    sim = Simulator(model, profile(), 2)

    def costed(**fields):
        lay = Layout(pp=2, global_batch_size=8, seq_len=16, **fields)
        est = sim.estimate(lay)
        d = est.derived
        # the runtime, given the no-op layers the simulator padded with
        plan = stage_plan(ParallelConfig(pp=lay.pp, vpp=lay.vpp, pp_stage_layers=lay.pp_stage_layers),
                          replace(model, noop_layers=d.noop_layers))
        slots = (num_layers + d.noop_layers) // (lay.pp * lay.vpp) if lay.pp_stage_layers is None else None
        want = [(sum(i < model.first_k_dense for i in ls), sum(i >= model.first_k_dense for i in ls),
                 slots - len(ls) if slots is not None else 0) for ls in plan.layers]
        assert [c[:3] for c in sim.chunk_layers(lay, d)] == want
        return est

    est = costed(**par)
    if heavier is not None:
        equal = costed(vpp=par.get("vpp", 1))
        lighter = 1 - heavier
        assert est.stage_busy[heavier] > 1.2 * equal.stage_busy[heavier]
        assert est.stage_busy[lighter] < 0.8 * equal.stage_busy[lighter]
    else:
        assert est.derived.noop_layers == 1


# ---------------------------------------------------------------------------------------------
# layout rules


@pytest.mark.parametrize("changes,devices,field", [
    (dict(tp=3), 12, "layout.tp"),  # 2 heads
    (dict(ep=3), 12, "layout.ep"),  # 8 experts
    (dict(tp=2, pp=4), 4, "layout.tp"),  # the runtime's rule and message (check_world)
    (dict(global_batch_size=6, micro_batch_size=4), 4, "layout.global_batch_size"),
    (dict(pp=4, global_batch_size=2), 4, "layout.global_batch_size"),  # 2 micro-batches < pp
    (dict(pp=2, vpp=2, global_batch_size=6), 4, "layout.vpp"),  # 3 micro-batches, pp 2
    (dict(ep=2, dispatcher="local"), 4, "layout.dispatcher"),
    (dict(tp=2, seq_len=15), 4, "layout.seq_len"),
    (dict(ep=8), 4, "layout.ep"),  # 8 expert ranks on a 4-rank stage
    (dict(pp=2, pp_stage_layers=[1, 1]), 4, "layout.pp_stage_layers"),  # 2 of 3 layers: the runtime's rule
])
def test_layout_rules_name_the_field(changes, devices, field):
    lay = Layout(**{**dict(global_batch_size=24, seq_len=16), **changes})
    with pytest.raises(ConfigError) as e:
        derive(tiny(num_experts=8, expert_ffn_size=4), lay, num_devices=devices, devices_per_node=4,
               pad_layers=False)
    assert str(e.value).startswith(field), str(e.value)


def test_layout_fields_validate_and_derive():
    with pytest.raises(ConfigError, match="etp"):
        from_dict(Layout, {"tp_extend_ep": True, "etp": 2})
    with pytest.raises(ConfigError, match="vpp"):
        from_dict(Layout, {"vpp": 2})
    d = derive(tiny(num_experts=8), Layout(tp=2, ep=2, tp_extend_ep=True, global_batch_size=8, seq_len=16), 8, 4)
    assert (d.dp, d.ep, d.etp, d.edp, d.micro_batches, d.experts_per_rank) == (4, 4, 1, 2, 2, 2)
    # 3 layers on 2 stages need one no-op layer when padding is allowed, and an error otherwise
    assert derive(tiny(), Layout(pp=2, global_batch_size=8, seq_len=16), 2, 4).noop_layers == 1
    with pytest.raises(ConfigError, match="noop_layers"):
        derive(tiny(), Layout(pp=2, global_batch_size=8, seq_len=16), 2, 4, pad_layers=False)


def test_ep_exposure_adds_dispatch_and_combine_by_hand():
    from simulator.layer_cost import LayerCosts
    cfg = tiny()
    lay = Layout(tp=1, pp=1, ep=2, dispatcher="alltoall", micro_batch_size=1, seq_len=16, global_batch_size=2,
                 recompute="none")
    d = derive(cfg, lay, 2, 4)
    # 16 tokens x top-2 x 8 bf16 values = 512 bytes of copies; over 2 ranks half of it moves
    # (256 B at 100 GB/s) with one 10 us step; the count exchange is one more step
    dispatch, combine = 10e-6 + (256 / 100e9 + 10e-6), 256 / 100e9 + 10e-6
    plain = LayerCosts(cfg, profile(), SimOptions())("moe", replace(lay, overlap=False), d)
    assert plain.ep_f == pytest.approx(dispatch + combine) and plain.ep_b == pytest.approx(dispatch + combine)
    lc = LayerCosts(cfg, profile(), SimOptions())
    pc = lc("moe", lay, d)
    shared_f = sum(o.fwd for o in pc.ops if o.name.startswith("shared"))
    shared_b = sum(o.bwd for o in pc.ops if o.name.startswith("shared"))
    # the dispatch hides behind the shared expert's forward, the combine's adjoint behind its backward
    assert pc.ep_f == pytest.approx(dispatch - shared_f + combine)
    assert pc.ep_b == pytest.approx(combine - shared_b + dispatch)


def test_quoted_peaks_come_from_one_table(monkeypatch):
    """The simulator's quoted profiles and the trainer's MFU denominator read parallel/peaks.py."""
    import torch

    from parallel.device import device_peak
    from parallel.peaks import QUOTED_PEAKS_TFLOPS
    from simulator.hardware import load_hardware, with_quoted_peak
    for name, key in (("ascend_910b_a2", "Ascend910B"), ("nvidia_h800", "H800"), ("nvidia_h100", "H100")):
        hw = load_hardware(name)
        assert hw.quoted_peak == key and hw.peak_tflops == QUOTED_PEAKS_TFLOPS[key]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H800 PCIe")
    assert device_peak("cuda", torch.float32).flops_per_s == load_hardware("nvidia_h800").peak_flops("bf16")
    with pytest.raises(ConfigError, match="not both"):
        with_quoted_peak({"quoted_peak": "H800", "peak_tflops": {"bf16": 1.0}})
    with pytest.raises(ConfigError, match="unknown device 'TPU'"):
        with_quoted_peak({"quoted_peak": "TPU"})


def test_breakdown_describes_the_busiest_stage_not_the_last_to_finish():
    """DeepSeek-V3 on PP 16: the first stage (embedding + 3 dense layers) is light and finishes
    last (it waits for every backward); the breakdown must show a heavy MoE stage's work instead of
    counting it as bubble, and list every stage's busy time."""
    from simulator.cost import Simulator
    from simulator.recipe import load_sim_recipe
    from simulator.schedule import BUSY_KINDS
    from pathlib import Path
    from simulator.hardware import load_hardware
    rec = load_sim_recipe(Path(__file__).parents[1] / "configs/simulator/deepseek_v3_2k_h800.yaml")
    est = Simulator(rec.model, load_hardware(rec.hardware), rec.num_devices, rec.options).estimate(rec.layout)
    assert len(est.stage_busy) == rec.layout.pp == 16
    assert est.critical_stage == max(range(16), key=est.stage_busy.__getitem__) != 0
    assert est.stage_busy[0] < 0.8 * est.stage_busy[est.critical_stage]  # the light first stage
    b = est.breakdown
    assert sum(b[k] for k in BUSY_KINDS) == pytest.approx(est.stage_busy[est.critical_stage])
    assert sum(v for k, v in b.items() if k != "total") == pytest.approx(est.step_time)


def test_context_parallel_is_not_free():
    """cp2 with micro-batch 2 holds the same tokens per rank as cp1 with micro-batch 1; it must cost
    more (the ring exchange of K/V and the smaller attention kernels), not the same."""
    from pathlib import Path
    from simulator.cost import Simulator
    from simulator.hardware import load_hardware
    from simulator.recipe import load_sim_recipe
    rec = load_sim_recipe(Path(__file__).parents[1] / "configs/simulator/deepseek_v3_2k_h800.yaml")
    sim = Simulator(rec.model, load_hardware(rec.hardware), rec.num_devices, rec.options)
    base = replace(rec.layout, pp=8, vpp=4, tp=2, ep=16, tp_extend_ep=True)
    one = sim.estimate(replace(base, cp=1, micro_batch_size=1))
    two = sim.estimate(replace(base, cp=2, micro_batch_size=2))
    assert one.breakdown["cp_comm"] == 0 and two.breakdown["cp_comm"] > 0
    assert two.breakdown["compute"] > one.breakdown["compute"]  # same FLOPs in smaller kernels
    assert two.step_time > one.step_time


def test_tp_regions_are_charged_as_the_runtime_issues_them():
    """Without SP a TP region sums with one all-reduce each way, with SP with an all-gather +
    reduce-scatter pair; TP-extend-EP without SP gathers the expert outputs (forward) and the
    input's gradient (backward). A profile that measured each collective prices them apart."""
    from simulator.layer_cost import LayerCosts
    cfg = tiny(expert_ffn_size=4, dense_ffn_size=12, vocab_size=12)
    # per-kind measured links (bandwidth GB/s, latency us): an all-reduce is cheap, the pair dear
    links = {"all_reduce": [100.0, 10.0], "all_gather": [100.0, 300.0], "reduce_scatter": [100.0, 500.0]}
    lc = LayerCosts(cfg, profile(collective_links=links), SimOptions(tp_comm_overlap=0.0))
    nbytes = 16 * 8 * 2  # 16 tokens of D = 8 in bf16
    ar = C.all_reduce(nbytes, 2, 1, 4).time(lc.hw)  # 2 steps x 10 us + 256 B / 100 GB/s
    assert ar == pytest.approx(2 * 10e-6 + nbytes / 100e9)
    pair = C.all_gather(nbytes, 2, 1, 4).time(lc.hw) + C.reduce_scatter(nbytes, 2, 1, 4).time(lc.hw)
    gather = C.all_gather(nbytes, 2, 1, 4).time(lc.hw)

    def tp_cost(kind, **over):
        lay = Layout(**{**dict(tp=2, micro_batch_size=1, seq_len=16, global_batch_size=2, recompute="none",
                               dispatcher="local", sequence_parallel=False), **over})
        return lc(kind, lay, derive(cfg, lay, 2, 4)).tp
    # dense layer: attention + MLP, two regions; MoE layer: attention, shared experts, expert TP sum
    assert tp_cost("dense") == pytest.approx(2 * ar)
    assert tp_cost("moe") == pytest.approx(3 * ar)
    assert tp_cost("dense", sequence_parallel=True) == pytest.approx(2 * pair)
    assert tp_cost("moe", sequence_parallel=True) == pytest.approx(3 * pair)
    assert tp_cost("moe", tp_extend_ep=True, dispatcher="alltoall") == pytest.approx(2 * ar + gather)
    assert tp_cost("moe", tp_extend_ep=True, dispatcher="alltoall", sequence_parallel=True) == pytest.approx(2 * pair)
