"""Checkpoints under pipeline parallelism: each pipeline rank saves the parameters and optimizer
states of its own stages under the full model's names (the last stage's embedding copy is the same
logical tensor as the first stage's), so the checkpoint loads under any other layout.

Saved after SAVE_AT steps under world 4 = pp2 x ep2 with ZeRO-1 (every stage's states sharded over
its data-parallel ranks). Loaded under: world 4 = ep4 without a pipeline (dp 4, grad_accum 2), world
2 = pp2 x vpp2 (other stage boundaries: one chunk of two layers becomes two chunks of one), and one
process (grad_accum 8). A second checkpoint, saved under world 4 = pp4 (one layer per rank, the
embedding copy on rank 3), resumes under world 4 = pp2 x vpp2 x dp2 with ZeRO-1: every rank then
gathers its two chunks from two saving ranks, and moments saved whole come back as ZeRO shards.
All train the same global batch of 8 micro-batches per step; the reference
is one process training every step with `train_step`. The resumed losses must stay within 1e-5
(relative) of the uninterrupted run, which they do only if weights, AdamW moments, step counters
and router biases were restored.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from moe_kernels import get_kernels
from launch.checkpoint.checkpointer import Checkpointer
from launch.trainer.recipe import CheckpointConfig, TrainConfig
from launch.trainer.step import train_step
from moe.config import ModelConfig
from moe.model import MoETransformer

MODEL = dict(vocab_size=64, hidden_size=32, num_layers=4, max_seq_len=32, num_heads=2, q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
             first_k_dense=1, num_experts=8, top_k=2, expert_ffn_size=16, num_shared_experts=1, mtp_layers=1,
             aux_loss_coeff=1e-2, expert_bias=True, bias_update_speed=0.05)
MICRO, MBS, SEQ, SAVE_AT, STEPS, CLIP, SEED = 8, 2, 16, 2, 4, 0.2, 1234  # MICRO: micro-batches per step, all ranks
TOL = 1e-5


def micro_batches(dp: int, dp_rank: int) -> list[dict]:
    """This data-parallel rank's share of every step's MICRO micro-batches, step by step."""
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, MODEL["vocab_size"], (STEPS, MICRO, MBS, SEQ + 1), generator=g)
    per = MICRO // dp
    return [{"tokens": t[:, :-1], "labels": t[:, 1:]} for step in tokens for t in step[dp_rank * per:(dp_rank + 1) * per]]


def adamw(model) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95))


def train_config(grad_accum: int) -> TrainConfig:
    return TrainConfig(grad_accum=grad_accum, micro_batch_size=MBS, seq_len=SEQ, grad_clip=CLIP)


@functools.lru_cache(maxsize=None)
def reference() -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin against the gloo ranks
    try:
        torch.manual_seed(SEED)
        model = MoETransformer(ModelConfig(**MODEL), get_kernels("fast"))
        opt, it = adamw(model), iter(micro_batches(1, 0))
        return [train_step(model, opt, it, train_config(MICRO), "cpu")["loss"] for _ in range(STEPS)]
    finally:
        torch.set_num_threads(threads)


def _rank(par: dict, ckpt_dir: str, load: bool, first: int, last: int, save_dir: str = "") -> list[float]:
    """Build layout `par`, optionally load, train steps [first, last) with train_step, then save
    (into `ckpt_dir` after a fresh start, into `save_dir`, if given, after a load)."""
    from parallel.config import ParallelConfig
    from parallel.runtime import ParallelRuntime
    cfg = ModelConfig(**MODEL)
    rt = ParallelRuntime.setup(ParallelConfig(**par), cfg)
    grad_accum = MICRO // rt.dp_size
    torch.manual_seed(SEED)
    model = rt.parallelize(rt.build_model(cfg, get_kernels("fast")))
    rt.attach_pipeline(model, grad_accum, MBS, SEQ)
    opt = rt.wrap_optimizer(adamw(model), model)
    ck = Checkpointer(CheckpointConfig(), ckpt_dir, runtime=rt, log=False)
    if load:
        assert ck.load(model, opt)["step"] == first
    it = iter(micro_batches(rt.dp_size, rt.dp_rank)[first * grad_accum:])
    losses = []
    for _ in range(first, last):
        m = train_step(model, opt, it, train_config(grad_accum), "cpu", grad_reducer=rt.grad_reducer,
                       pipeline=rt.forward_backward)
        losses.append(rt.mean_over_dp({"loss": m["loss"]})["loss"])
    if not load or save_dir:
        out = Checkpointer(CheckpointConfig(), save_dir, runtime=rt, log=False) if load else ck
        out.save(last, model, opt, {"tokens": last * MICRO * MBS * SEQ})
        out.close()
    ck.close()
    return losses


def _recorded_layout(ckpt_dir: str) -> dict:
    """The layout meta.json records for the newest checkpoint under `ckpt_dir`."""
    newest = Checkpointer(CheckpointConfig(), ckpt_dir, log=False).latest()
    return json.loads((Path(newest) / "meta.json").read_text())["layout"]


def _close(got: list, want: list) -> None:
    for s, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= TOL * abs(b), f"step {s}: loss {a} vs reference {b}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("pp-ckpt") / "ckpt")
    out = run_distributed(_rank, 4, dict(pp=2, ep=2, zero1=True), d, False, 0, SAVE_AT, timeout=240)
    for losses in out:
        _close(losses, reference()[:SAVE_AT])
    return d


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world, par", [(4, dict(ep=4)), (2, dict(pp=2, vpp=2))], ids=["ep4", "pp2-vpp2"])
def test_pp_checkpoint_resumes_under_another_layout(saved, world, par):
    for losses in run_distributed(_rank, world, par, saved, True, SAVE_AT, STEPS, timeout=240):
        _close(losses, reference()[SAVE_AT:])


def test_pp_checkpoint_resumes_in_one_process(saved):
    torch.manual_seed(SEED)
    model = MoETransformer(ModelConfig(**MODEL), get_kernels("fast"))
    opt = adamw(model)
    info = Checkpointer(CheckpointConfig(), saved, log=False).load(model, opt)
    assert info["step"] == SAVE_AT
    assert info["layout"] == {"tp": 1, "pp": 2, "vpp": 1, "ep": 2, "etp": 1, "dp": 2, "edp": 1, "rank_order": "tp-cp-dp", "zero1": True}
    it = iter(micro_batches(1, 0)[SAVE_AT * MICRO:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = [train_step(model, opt, it, train_config(MICRO), "cpu")["loss"] for _ in range(SAVE_AT, STEPS)]
    finally:
        torch.set_num_threads(threads)
    _close(losses, reference()[SAVE_AT:])


@pytest.fixture(scope="module")
def saved_pp4(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("pp4-ckpt") / "ckpt")
    for losses in run_distributed(_rank, 4, dict(pp=4), d, False, 0, SAVE_AT, timeout=240):
        _close(losses, reference()[:SAVE_AT])
    assert _recorded_layout(d) == {"tp": 1, "pp": 4, "vpp": 1, "ep": 1, "etp": 1, "dp": 1, "edp": 1, "rank_order": "tp-cp-dp", "zero1": False}
    return d


@pytest.mark.timeout(300)
def test_pp4_checkpoint_resumes_under_pp2_vpp2(saved_pp4, tmp_path):
    # pp4's rank r held layer r; under pp2 x vpp2 rank 0 holds layers 0 and 2, rank 1 layers 1 and 3
    # (virtual stage s = chunk * pp + rank), each replicated over dp2 with ZeRO-1 moments.
    again = str(tmp_path / "ckpt")  # the resumed run saves too: its meta.json records vpp 2
    out = run_distributed(_rank, 4, dict(pp=2, vpp=2, zero1=True), saved_pp4, True, SAVE_AT, STEPS, again,
                          timeout=240)
    for losses in out:
        _close(losses, reference()[SAVE_AT:])
    assert _recorded_layout(again) == {"tp": 1, "pp": 2, "vpp": 2, "ep": 1, "etp": 1, "dp": 2, "edp": 2, "rank_order": "tp-cp-dp", "zero1": True}
