"""Running a pipeline rank's stages: 1F1B (vpp = 1) or interleaved 1F1B (vpp > 1) from
`torch.distributed.pipelining`, one optimizer step's micro-batches (train.grad_accum) per call.

`PipelineRunner.forward_backward(batches, t, device)` is the pipeline's replacement for the
single-process micro-batch loop of `launch.trainer.step.train_step`: it reads the step's
micro-batches (every rank of a data-parallel index reads the same ones: the first stage needs the
tokens, the last the labels, and the tokens again for MTP), runs the schedule, and returns the loss
terms summed over the stages (each stage recorded the terms it computed; one all-reduce over the
pipeline group adds them) as means over the micro-batches, like the single-process loop, and the
per-layer routing load of the whole model (zeros for layers on other stages, summed likewise).

The stages are static (`input_args` / `output_args` given): torch's dynamic shape inference would
run the model once on dummy data, which here would exchange tokens between EP ranks and count
routing load. Gradients are averaged over micro-batches by the schedule (`scale_grads`), which
matches the single-process loop's `loss / grad_accum`.

Timing: every stage's forward and backward compute is timed; the bubble fraction of a rank is the
part of the schedule's wall time that is not its own compute (P2P waits, fill and drain), the
quantity the simulator's schedule model predicts ((p - 1) / (v m + p - 1) for equal stages).
P2P bytes are the activations and activation gradients the rank sends to its neighbours.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from parallel.pipeline import PipelineModel, StageChunk

LOSS_TERMS = ("lm_loss", "mtp_loss", "aux_loss", "z_loss")


def _last_stage_loss(output: torch.Tensor, _target) -> torch.Tensor:
    return output  # the last stage's module already computes the micro-batch's loss


class PipelineRunner:
    def __init__(self, model: PipelineModel, pp_group, micro_batches: int, micro_batch_size: int,
                 seq_len: int, device: str = "cpu", seq_shards: int = 1, fb_overlap: bool = False):
        """`seq_shards`: sequence parallelism splits the activations between stages over that many
        TP ranks (each sends its positions to the same TP rank of the next stage). `fb_overlap`:
        run each backward beside a later forward (parallel/pipeline_overlap.py) instead of 1F1B."""
        self.model, self.group, self.m = model, pp_group, micro_batches
        self.seq_shards = seq_shards
        self.device = torch.device(device)
        cfg, plan = model.cfg, model.plan
        act = (micro_batch_size, seq_len // seq_shards, cfg.hidden_size)
        self.act_bytes = micro_batch_size * seq_len // seq_shards * cfg.hidden_size * 4  # fp32 activations
        self.stages, self.overlapped = [], None
        if fb_overlap:
            from parallel.pipeline_overlap import OverlappedPipeline
            self.overlapped = OverlappedPipeline(model, pp_group, plan.pp, micro_batches, act, self.device, self)
            self.reset_timers()
            return
        for chunk in model.chunks:
            inp = (torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device=device) if chunk.is_first
                   else torch.empty(act, device=device, requires_grad=True))
            out = (torch.empty((), device=device, requires_grad=True) if chunk.is_last
                   else torch.empty(act, device=device, requires_grad=True))
            stage = PipelineStage(chunk, chunk.stage, plan.num_stages, self.device, input_args=inp,
                                  output_args=out, group=pp_group)
            self._instrument(stage, chunk)
            self.stages.append(stage)
        if plan.vpp == 1:
            self.schedule = Schedule1F1B(self.stages[0], micro_batches, loss_fn=_last_stage_loss)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, micro_batches, loss_fn=_last_stage_loss)
        self.reset_timers()

    # --- timing and bytes ---
    def reset_timers(self) -> None:
        self.fwd_s = [0.0] * len(self.model.chunks)  # per chunk, in the order of model.chunks
        self.bwd_s = [0.0] * len(self.model.chunks)
        self.p2p_bytes = 0
        self.schedule_s = 0.0

    def _instrument(self, stage: PipelineStage, chunk: StageChunk) -> None:
        i = len(self.stages)
        fwd, bwd = stage.forward_one_chunk, stage.backward_one_chunk

        def timed_fwd(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fwd(*args, **kwargs)
            finally:
                self.fwd_s[i] += time.perf_counter() - start
                self.p2p_bytes += 0 if chunk.is_last else self.act_bytes

        def timed_bwd(*args, **kwargs):
            start = time.perf_counter()
            try:
                return bwd(*args, **kwargs)
            finally:
                self.bwd_s[i] += time.perf_counter() - start
                self.p2p_bytes += 0 if chunk.is_first else self.act_bytes
        stage.forward_one_chunk, stage.backward_one_chunk = timed_fwd, timed_bwd

    # --- one step ---
    def forward_backward(self, batches: Iterator[dict], grad_accum: int, device: str, autocast) -> tuple[dict, list]:
        """Run the step's micro-batches through the schedule (forward and backward); return the
        loss terms (means over micro-batches, summed over stages) and the routing load per MoE
        layer of the full model."""
        if grad_accum != self.m:
            raise ValueError(f"PipelineRunner: built for {self.m} micro-batches, asked for {grad_accum}")
        model = self.model
        model.train()
        mbs = [next(batches) for _ in range(self.m)]
        tokens = torch.cat([b["tokens"] for b in mbs]).to(device)
        labels = torch.cat([b["labels"] for b in mbs]).to(device)
        kwargs = {"tokens": tokens, "labels": labels}
        if mbs[0].get("loss_mask") is not None:
            kwargs["loss_mask"] = torch.cat([b["loss_mask"] for b in mbs]).to(device)
        for chunk in model.chunks:
            chunk.reset_step()
        args = (tokens,) if model.has_first else ()
        start = time.perf_counter()
        if self.overlapped is not None:
            self.overlapped.step([{k: v.to(device) if v is not None else None for k, v in mb.items()} for mb in mbs],
                                 autocast)
        else:
            with autocast:
                self.schedule.step(*args, target=labels, return_outputs=False, **kwargs)
        self.schedule_s += time.perf_counter() - start
        return self._gather(model.chunks)

    def _gather(self, chunks: list[StageChunk]) -> tuple[dict, list]:
        cfg = self.model.cfg
        n_moe = cfg.num_moe_layers + (cfg.mtp_layers if cfg.num_moe_layers > 0 else 0)
        terms = torch.zeros(len(LOSS_TERMS), dtype=torch.float64)
        for chunk in chunks:
            for rec in chunk.records:
                terms += torch.tensor([rec.get(k, 0.0) for k in LOSS_TERMS], dtype=torch.float64)
        load = torch.zeros(n_moe, cfg.num_experts, dtype=torch.float64)
        index = iter(self.model.moe_layer_index())
        for chunk in chunks:  # moe_layer_index follows the rank's module order: chunk by chunk
            for acc in chunk.load:
                load[next(index)] += acc.double().cpu()
        flat = torch.cat([terms, load.flatten()])
        # fp64 on CPU, fp32 on devices (HCCL reduces no fp64): loads are integer counts either way
        buf = flat.to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        flat = buf.cpu().double()
        sums = {k: float(v) / self.m for k, v in zip(LOSS_TERMS, flat[:len(LOSS_TERMS)])}
        sums["loss"] = sums["lm_loss"] + cfg.mtp_loss_weight * sums["mtp_loss"] + sums["aux_loss"] + sums["z_loss"]
        loads = list(flat[len(LOSS_TERMS):].view(n_moe, cfg.num_experts).float().unbind(0))
        return sums, loads

    def step_metrics(self) -> dict:
        """Per-stage forward/backward seconds, this step's bubble fraction (mean over the pipeline
        ranks), P2P bytes sent by all ranks. Collective over the world; resets the timers."""
        plan = self.model.plan
        world = dist.get_world_size()
        per_stage = torch.zeros(2 * plan.num_stages + 2, dtype=torch.float64)
        for chunk, f, b in zip(self.model.chunks, self.fwd_s, self.bwd_s):
            per_stage[chunk.stage], per_stage[plan.num_stages + chunk.stage] = f, b
        busy = sum(self.fwd_s) + sum(self.bwd_s)
        # with fb_overlap a forward and a backward may run at once: the busy time can exceed the wall time
        per_stage[-2] = max(0.0, 1.0 - busy / self.schedule_s) if self.schedule_s > 0 else 0.0
        per_stage[-1] = self.p2p_bytes
        buf = per_stage.to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        tot = buf.cpu().double()
        replicas = world // plan.pp  # every stage runs on world / pp ranks
        self.reset_timers()
        n = plan.num_stages
        return {"pp_stage_forward_s": [float(x) / replicas for x in tot[:n]],
                "pp_stage_backward_s": [float(x) / replicas for x in tot[n:2 * n]],
                "pp_bubble_fraction": float(tot[-2]) / world,
                "pp_p2p_bytes": int(tot[-1])}

    # --- evaluation: one batch at a time through the stages, no schedule ---
    @torch.no_grad()
    def eval_lm_loss(self, batch: dict, device: str) -> float:
        """The LM loss of one batch: stages run in order, activations sent point to point."""
        model, group = self.model, self.group
        plan = model.plan
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        shape = (tokens.shape[0], tokens.shape[1] // self.seq_shards, model.cfg.hidden_size)
        lm = torch.zeros((), dtype=torch.float64 if self.device.type == "cpu" else torch.float32, device=device)
        for chunk in model.chunks:
            s = chunk.stage
            x = tokens
            if not chunk.is_first:
                x = torch.empty(shape, device=device)
                dist.recv(x, group_src=(s - 1) % plan.pp, group=group)
            chunk.records = []
            out = chunk(x, tokens, labels)
            if chunk.is_last:
                lm.fill_(chunk.records[-1]["lm_loss"])
            else:
                dist.send(out.contiguous(), group_dst=(s + 1) % plan.pp, group=group)
        dist.all_reduce(lm, op=dist.ReduceOp.SUM, group=group)
        return float(lm)

