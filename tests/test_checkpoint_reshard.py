"""Resharding on load: a checkpoint written under one parallel layout loads under others, optimizer
states included, and training continues with the losses of the uninterrupted single-process run.

Saved under world 4 = ep 2 x edp 2 with ZeRO-1 (expert stacks split by rows over EP ranks, every
optimizer moment split into uneven flat ranges over the replicas). Loaded under: world 8 = ep 8
with ZeRO-1 (dense moments in 8 ranges); world 2 = ep 2 with ZeRO-1 (no expert replicas); world 4
= tp 2 x ep 2 with expert TP and ZeRO-1 (heads, MLP rows and columns, expert FFN columns split:
blocks that are not row ranges, and ZeRO ranges of them); and one process without ZeRO (every
tensor whole). The save is asynchronous, and the weights are changed
while it is being written: the checkpoint must hold the values at the moment of `save`.
The reference is one process training all steps on the global batch (as in
test_parallel_equivalence.py, whose tolerances apply: relative 1e-5 on losses, which the ranks
reach only if the loaded weights, moments, step counters and router biases are right).
The single-process load also compares every loaded AdamW moment with the reference's own state at
the save step.
"""
from __future__ import annotations

import functools

import pytest
import torch

from dist_utils import run_distributed
from moe_kernels import get_kernels
from launch.checkpoint.checkpointer import Checkpointer
from launch.trainer.recipe import CheckpointConfig
from moe.config import ModelConfig
from moe.model import MoETransformer

MODEL = dict(vocab_size=64, hidden_size=32, num_layers=3, max_seq_len=32, num_heads=2, q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
             first_k_dense=1, num_experts=8, top_k=2, expert_ffn_size=16, num_shared_experts=1, mtp_layers=1,
             aux_loss_coeff=0.0, expert_bias=True, bias_update_speed=0.05, score_func="sigmoid")
GLOBAL_BATCH, SEQ, SAVE_AT, STEPS, LR, CLIP, SEED = 8, 16, 2, 4, 1e-2, 0.2, 1234
TOL = 1e-5  # losses (relative)
TOL_STATE = 1e-4  # optimizer moments after SAVE_AT steps (relative norm), as final params there


def batches() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, MODEL["vocab_size"], (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)


def build() -> MoETransformer:
    torch.manual_seed(SEED)
    return MoETransformer(ModelConfig(**MODEL), get_kernels("fast"))


def adamw(model) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, betas=(0.9, 0.95))


def step(model, optimizer, tokens, reduce_grads, mean_loss) -> float:
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    reduce_grads()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_expert_bias()
    return mean_loss(float(out.loss.detach()))


@functools.lru_cache(maxsize=None)
def reference() -> dict:
    model = build()
    opt = adamw(model)
    losses, state_at_save = [], None
    for s, tokens in enumerate(batches()):
        losses.append(step(model, opt, tokens, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP),
                           lambda x: x))
        if s + 1 == SAVE_AT:
            names = {id(p): n for n, p in model.named_parameters()}
            state_at_save = {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    return {"loss": losses, "state": state_at_save}


def _rank(par: dict, ckpt_dir: str, load: bool, first: int, last: int) -> dict:
    """On every rank: build the layout `par`, optionally load, train steps [first, last), maybe save."""
    from parallel.config import ParallelConfig
    from parallel.runtime import ParallelRuntime
    model = build()
    rt = ParallelRuntime.setup(ParallelConfig(**par), model.cfg)
    rt.parallelize(model)
    opt = rt.wrap_optimizer(adamw(model), model)
    # Saving uses the async path: the write runs in a thread over the checkpoint's own gloo group.
    ck = Checkpointer(CheckpointConfig(async_save=not load), ckpt_dir, runtime=rt, log=False)
    if load:
        info = ck.load(model, opt)
        assert info["step"] == first, info
    b = GLOBAL_BATCH // rt.dp_size
    losses = [step(model, opt, tokens[rt.dp_rank * b:(rt.dp_rank + 1) * b], lambda: rt.grad_reducer(None, CLIP),
                   lambda x: rt.mean_over_dp({"loss": x})["loss"])
              for tokens in batches()[first:last]]
    if not load:
        assert ck.save(last, model, opt, {"tokens": last * GLOBAL_BATCH * SEQ}) is None  # in flight
        for p in model.parameters():  # the loop may change the weights while the save is written
            p.data.add_(1.0)
    ck.close()
    return {"loss": losses, "sharded": [n for n, p in model.named_parameters() if p.shape[0] == 8 // par["ep"]
                                        and n.endswith("w1_EDF")], "split": sorted(rt.shards)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, list]:
    d = str(tmp_path_factory.mktemp("reshard") / "ckpt")
    out = run_distributed(_rank, 4, dict(ep=2, dispatcher="alltoall", zero1=True), d, False, 0, SAVE_AT)
    return d, out[0]["loss"]


def _close(got: list, want: list) -> None:
    for s, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= TOL * abs(b), f"step {s}: loss {a} vs reference {b}"


def test_saving_layout_matches_reference(saved):
    _close(saved[1], reference()["loss"][:SAVE_AT])


@pytest.mark.parametrize("world, par", [
    (8, dict(ep=8, dispatcher="alltoall", zero1=True)),
    (2, dict(ep=2, dispatcher="allgather", zero1=True)),
    (4, dict(tp=2, ep=2, dispatcher="alltoall", zero1=True)),
], ids=["w8-ep8-zero1", "w2-ep2-zero1", "w4-tp2xep2-etp2-zero1"])
def test_resume_under_other_layout(saved, world, par):
    out = run_distributed(_rank, world, par, saved[0], True, SAVE_AT, STEPS, timeout=240)
    assert out[0]["sharded"], "the expert stacks must really be sharded in this layout"
    if par.get("tp", 1) > 1:  # attention heads, MLP rows/columns and expert FFN columns are split too
        assert {"layers.0.attn.wo.weight", "layers.1.mlp.experts.w2_EFD"} <= set(out[0]["split"])
    for r, o in enumerate(out):
        _close(o["loss"], reference()["loss"][SAVE_AT:])


def _check_in_one_process(ckpt_dir: str, layout: dict) -> None:
    """Load into one process: the layout is recorded, the optimizer moments equal the reference's,
    and training continues with the reference's losses."""
    model = build()
    opt = adamw(model)
    info = Checkpointer(CheckpointConfig(), ckpt_dir, log=False).load(model, opt)
    assert info["step"] == SAVE_AT and info["layout"] == layout
    want = reference()["state"]
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        ref = want[names[id(p)]]
        assert float(st["step"]) == float(ref["step"]) == SAVE_AT
        for k in ("exp_avg", "exp_avg_sq"):
            rel = float((st[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-30))
            assert rel <= TOL_STATE, f"{names[id(p)]}.{k} differs from the reference by {rel:.1e}"
    losses = [step(model, opt, tokens, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP),
                   lambda x: x) for tokens in batches()[SAVE_AT:]]
    _close(losses, reference()["loss"][SAVE_AT:])


def test_resume_in_one_process_with_the_reference_optimizer_state(saved):
    _check_in_one_process(saved[0], {"tp": 1, "pp": 1, "vpp": 1, "ep": 2, "etp": 1, "dp": 4, "edp": 2, "rank_order": "tp-cp-dp", "zero1": True})


LAYOUT_TP = {"tp": 2, "pp": 1, "vpp": 1, "ep": 4, "etp": 1, "dp": 2, "edp": 1, "rank_order": "tp-cp-dp", "zero1": True}  # experts over ep x tp = 4 ranks


def test_checkpoint_saved_under_tensor_parallelism_loads_in_one_process(tmp_path):
    # tp 2 x ep 2 with TP-extend-EP: attention heads and dense MLP split over TP, experts over 4 ranks.
    d = str(tmp_path / "ckpt")
    par = dict(tp=2, ep=2, tp_extend_ep=True, dispatcher="alltoall", zero1=True)
    out = run_distributed(_rank, 4, par, d, False, 0, SAVE_AT, timeout=240)
    assert "layers.0.attn.wo.weight" in out[0]["split"]
    _close(out[0]["loss"], reference()["loss"][:SAVE_AT])
    _check_in_one_process(d, LAYOUT_TP)
