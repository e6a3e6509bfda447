"""The cost model of one training step: per-layer costs (`layer_cost.py`) assembled into pipeline
stages, the schedule, data-parallel communication, the optimizer step and memory per device.

`Simulator(model, hw, num_devices, options).estimate(layout)` is the whole model for one layout,
with the event-level pipeline timeline; `.quick(layout)` is the same arithmetic with the closed-form
schedule, which the search uses (costs are cached by the few layout fields they depend on, so a
layout costs tens of microseconds).

After the pipeline: the DP gradient reduce-scatter hides behind the last micro-batch's backward and
the parameter all-gather behind the next step's first forward; then the optimizer step (on the
device, or on the host with offload). PP hand-offs delay the dependent stage.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from moe import accounting as acc
from moe.config import ModelConfig
from moe.mfu_conventions import CONVENTIONS, flops_per_token
from simulator.bands import band_for, layout_features, step_time_interval
from simulator import memory as M
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.layer_cost import LayerCosts, PartCost, SimOptions
from simulator.estimate import Estimate, PipeSums
from simulator.step_cost import dp_step_times, p2p_time
from simulator.layout import Derived, Layout, derive
from parallel.pipeline_layout import stage_sizes
from simulator.schedule import BUSY_KINDS, in_flight_per_chunk, simulate, step_breakdown

KINDS = ("dense", "moe", "noop", "embed", "head", "mtp")  # parts a virtual stage may hold

__all__ = ["Estimate", "SimOptions", "Simulator"]


class Simulator:
    def __init__(self, model: ModelConfig, hw: HardwareProfile, num_devices: int,
                 options: Optional[SimOptions] = None):
        self.model, self.hw, self.num_devices = model, hw, num_devices
        self.opt = options or SimOptions()
        self.opt.validate("options")
        self.b = DTYPE_BYTES[self.opt.dtype]
        # forward/backward compute at the profile's calibrated corrections (1 for quoted profiles);
        # the MFU peak and the optimizer's measured cost stay as the profile states them
        self.layer_cost = LayerCosts(model, hw.corrected(), self.opt)
        self.cm = self.layer_cost.cm
        self.peak = hw.peak_flops(self.opt.dtype)
        self._cache: dict = {}
        self.pc = acc.param_counts(model)
        self._tensors = self._tensors_per_kind()

    def clear_cache(self) -> None:
        """Forget every cached cost, so the next layout is costed cold (benchmarks)."""
        self._cache.clear()
        self.layer_cost.clear_cache()

    # ------------------------------------------------------------------------------------------
    # stages

    @staticmethod
    def _stages_key(lay: Layout, d: Derived) -> tuple:
        """The fields that decide which layers each virtual stage holds (cache keys)."""
        explicit = tuple(lay.pp_stage_layers) if lay.pp_stage_layers is not None else None
        return lay.pp, lay.vpp, d.layers_per_chunk, d.noop_layers, explicit

    def chunk_layers(self, lay: Layout, d: Derived) -> list[tuple]:
        """Per virtual stage (index c * pp + rank): counts of each of `KINDS` it holds. The layers
        per stage come from the runtime's own rule (`stage_sizes`, explicit `pp_stage_layers`
        included), so the costed stages are the ones the trainer builds."""
        key = ("layers",) + self._stages_key(lay, d)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cfg = self.model
        sizes = stage_sizes(lay.pp, lay.vpp, cfg.num_layers, d.noop_layers, lay.pp_stage_layers)
        out = []
        layer = 0
        for s, (real, noop) in enumerate(sizes):
            dense = max(0, min(real, cfg.first_k_dense - layer))
            layer += real
            last = s == len(sizes) - 1
            out.append((dense, real - dense, noop, int(s == 0), int(last), cfg.mtp_layers if last else 0))
        self._cache[key] = out
        return out

    def _chunk_cost(self, counts: tuple, lay: Layout, d: Derived, lkey: tuple) -> PartCost:
        key = ("chunk", lkey, counts)
        hit = self._cache.get(key)
        if hit is None:
            hit = PartCost()
            for kind, n in zip(KINDS, counts):
                if n:
                    hit.add(self.layer_cost(kind, lay, d), n)
            kept, swapped = self._full_layers_saving(lay, d, counts)
            hit.act -= kept
            hit.swapped -= swapped
            self._cache[key] = hit
        return hit

    def _full_layers_saving(self, lay: Layout, d: Derived, counts: tuple) -> tuple[float, float]:
        """(kept, swapped) bytes of one micro-batch that a chunk with these part counts does not hold
        because `memory_policy.full_layers` recomputes its first layers whole (dense layers come
        first; MTP blocks are not among them, as in parallel/recompute.py)."""
        n = lay.memory_policy.full_layers if lay.memory_policy else 0
        kept = swapped = 0.0
        for kind, count in (("dense", counts[0]), ("moe", counts[1])):
            k = min(n, count)
            n -= k
            if k:
                c = self.layer_cost(kind, lay, d)
                kept += k * (c.act - c.act_whole)
                swapped += k * c.swapped
        return kept, swapped

    def _kind_vectors(self, lay: Layout, d: Derived, lkey: tuple) -> tuple:
        """Per quantity, the value of one part of each kind in `KINDS`: steady and warm-up forward and
        backward time, kept activations, activations without recompute, swapped bytes."""
        key = ("kinds", lkey)
        hit = self._cache.get(key)
        if hit is None:
            costs = [self.layer_cost(k, lay, d) for k in KINDS]
            hit = self._cache[key] = tuple(
                tuple(fn(c) for c in costs) for fn in (
                    lambda c: c.fwd(True), lambda c: c.bwd(True), lambda c: c.fwd(False), lambda c: c.bwd(False),
                    lambda c: c.act, lambda c: c.act_full, lambda c: c.swapped))
        return hit

    def _rank_sums(self, comp: tuple, lay: Layout, d: Derived, lkey: tuple) -> tuple:
        """Sums over one rank's chunks (composition `comp`, one count tuple per chunk). Chunk costs are
        linear in their part counts, so these are dot products with `_kind_vectors` over the kinds
        present (precomputed per composition)."""
        key = ("rank", lkey, comp)
        hit = self._cache.get(key)
        if hit is None:
            f_st, b_st, f_w, b_w, act, act_full, swapped = self._kind_vectors(lay, d, lkey)
            tot, chunks, params_key, tensors = self._composition(comp)
            hit = (sum(f_st[i] * n for i, n in tot), sum(b_st[i] * n for i, n in tot),
                   sum(f_w[i] * n for i, n in tot), sum(b_w[i] * n for i, n in tot),
                   [sum(act[i] * n for i, n in c) - self._full_layers_saving(lay, d, cnt)[0]
                    for c, cnt in zip(chunks, comp)],
                   max(sum(act_full[i] * n for i, n in c) for c in chunks),
                   max(sum(swapped[i] * n for i, n in c) - self._full_layers_saving(lay, d, cnt)[1]
                       for c, cnt in zip(chunks, comp)),
                   self._params(params_key, lay.tp, d.ep, d.etp, lay.vocab_shards), tensors)
            self._cache[key] = hit
        return hit

    def _composition(self, comp: tuple) -> tuple:
        """(nonzero (kind, count) totals, the same per chunk, totals tuple, parameter tensors)."""
        key = ("comp", comp)
        hit = self._cache.get(key)
        if hit is None:
            tot = tuple(sum(col) for col in zip(*comp))
            hit = self._cache[key] = ([(i, n) for i, n in enumerate(tot) if n],
                                      [[(i, n) for i, n in enumerate(c) if n] for c in comp], tot,
                                      sum(n * self._tensors[k] for k, n in zip(KINDS, tot)))
        return hit

    def _params(self, tot: tuple, tp: int, ep: int, etp: int, vt: int) -> tuple[float, float]:
        key = ("params", tot, tp, ep, etp, vt)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = M.stage_params(self.model, tot[0], tot[1], bool(tot[3]), bool(tot[4]),
                                                    tp, ep, etp, self.pc, vt)
        return hit

    def _structure(self, lay: Layout, d: Derived) -> tuple:
        """(chunk compositions per rank group, rank -> group, lowest rank of each group, group sizes)."""
        key = ("structure",) + self._stages_key(lay, d)
        hit = self._cache.get(key)
        if hit is None:
            p, v = lay.pp, lay.vpp
            layers = self.chunk_layers(lay, d)
            comps: list[tuple] = []
            group, reps, sizes = [], [], []
            for r in range(p):
                comp = tuple(layers[c * p + r] for c in range(v))
                if comp not in comps:
                    comps.append(comp)
                    reps.append(r)
                    sizes.append(0)
                g = comps.index(comp)
                group.append(g)
                sizes[g] += 1
            hit = self._cache[key] = (comps, group, reps, sizes)
        return hit

    def pipe(self, lay: Layout, d: Derived) -> PipeSums:
        """Per-rank-group sums of chunk costs for a layout (cached by the fields they depend on)."""
        lkey = (lay.tp, lay.cp, d.ep, d.etp, lay.micro_batch_size, lay.seq_len, lay.recompute, lay.swap,
                lay.dispatcher, d.devices_per_node, lay.sequence_parallel, lay.overlap,
                tuple(sorted(d.strides.items())), lay.vocab_parallel,
                M.policy_key(lay.memory_policy) if lay.memory_policy else None)
        key = ("pipe", lkey) + self._stages_key(lay, d)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        comps, group, reps, sizes = self._structure(lay, d)
        g = [self._rank_sums(comp, lay, d, lkey) for comp in comps]
        w_w = [x[2] + x[3] for x in g]
        pipe = PipeSums(lkey=lkey, group=group, reps=reps, sizes=sizes,
                     f_st=[x[0] for x in g], b_st=[x[1] for x in g], f_w=[x[2] for x in g], b_w=[x[3] for x in g],
                     act=[x[4] for x in g], act_full=[x[5] for x in g], swapped=[x[6] for x in g],
                     params=[x[7] for x in g], tensors=[x[8] for x in g],
                     w_st_max=max(x[0] + x[1] for x in g), w_w_max=max(w_w),
                     w_w_total=sum(n * w for n, w in zip(sizes, w_w)))
        self._cache[key] = pipe
        return pipe

    def chunks(self, lay: Layout, d: Derived) -> list[PartCost]:
        """Cost of every virtual stage (index c * pp + rank), for the timeline."""
        lkey = self.pipe(lay, d).lkey
        return [self._chunk_cost(c, lay, d, lkey) for c in self.chunk_layers(lay, d)]

    def _tensors_per_kind(self) -> dict:
        """Parameter tensors per layer kind: the per-tensor optimizer loop of the CPU reference costs this."""
        cfg = self.model
        attn = len(acc.attention_linears(cfg)) + (1 + (cfg.q_lora_rank > 0) if cfg.attention == "mla" else 0)
        block = attn + (4 if cfg.norm == "sandwich" else 2)
        moe = block + 4 + (3 if cfg.num_shared_experts else 0)
        return {"dense": block + 3, "moe": moe, "noop": 0, "embed": 1, "head": 1 + (not cfg.tie_embeddings),
                "mtp": moe + 4}

    def states(self, lay: Layout, d: Derived, dense: float, expert: float) -> M.StateBytes:
        return M.state_bytes(dense, expert, self.b, d.dp * lay.cp, d.edp, lay.zero1, lay.optimizer_offload)

    def states_peak(self, lay: Layout, d: Derived) -> float:
        """Largest model-state footprint over the pipeline ranks (no activations): a lower bound on
        the peak memory of every layout that shares these sizes."""
        pipe = self.pipe(replace(lay, micro_batch_size=1, recompute="full", swap=False,
                                 dispatcher="local" if d.ep == 1 else "alltoall"), d)
        return max(self.states(lay, d, de, ex).total for de, ex in pipe.params)

    # ------------------------------------------------------------------------------------------
    # step

    def derive(self, lay: Layout) -> Derived:
        return derive(self.model, lay, self.num_devices, self.hw.devices_per_node, self.opt.pad_layers)

    def _p2p_time(self, lay: Layout, d: Derived) -> float:
        if lay.pp == 1:
            return 0.0
        key = ("p2p", lay.pp, lay.tp, lay.cp, d.dp, lay.micro_batch_size, lay.seq_len, d.devices_per_node,
               lay.sequence_parallel, d.strides["pp"])
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = p2p_time(self.model, self.hw, self.b, lay, d)
        return hit

    def _dp_times(self, lay: Layout, d: Derived, dense: float, expert: float, tensors: int) -> tuple:
        """(gradient reduction, parameter all-gather, optimizer step) seconds for one rank."""
        key = ("dp", dense, expert, d.dp * lay.cp, d.edp, lay.zero1, lay.optimizer_offload, lay.tp,
               d.ep * d.etp, d.devices_per_node, tensors, d.strides["ddp"], d.strides["edp"])
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = self._cache[key] = dp_step_times(self.hw, self.opt, self.b, lay, d, dense, expert, tensors)
        return out

    def quick(self, lay: Layout, d: Optional[Derived] = None) -> Estimate:
        """Closed-form estimate (no timeline): what the search ranks by."""
        return self._estimate(lay, d or self.derive(lay), timeline=False)

    def estimate(self, lay: Layout) -> Estimate:
        """Full estimate: event-level pipeline timeline, breakdown by kind and by operator."""
        return self._estimate(lay, self.derive(lay), timeline=True)

    def _estimate(self, lay: Layout, d: Derived, timeline: bool) -> Estimate:
        """The whole step for one layout. Kept as one function (about 65 lines) so the order of the
        cost assembly (pipeline, DP communication, optimizer, memory, breakdown) reads top to bottom."""
        p, v, m = lay.pp, lay.vpp, d.micro_batches
        pipe = self.pipe(lay, d)
        grp = pipe.group
        p2p = self._p2p_time(lay, d)
        tl = None
        if timeline:
            chunks = self.chunks(lay, d)
            tl = simulate(p, v, m,
                          lambda r, c, ph: chunks[c * p + r].fwd(ph == "steady"),
                          lambda r, c, ph: chunks[c * p + r].bwd(ph == "steady"),
                          p2p=p2p, act=lambda r, c: chunks[c * p + r].act,
                          comm=lambda r, c, k, ph: chunks[c * p + r].exposed(k, ph == "steady"))
            finish = tl.finish
            ranks = range(p)
        else:
            # blocking hand-offs sit on the critical path once each way per micro-batch
            h = 2 * p2p
            finish = [m * (pipe.w_st_max + h) + (pipe.w_w_total + h * p - pipe.w_w_max - h) / v] * p
            if p == 1:  # the first forward and the last backward are warm-up / cool-down (schedule.py)
                finish = [(m - 1) * pipe.w_st_max + pipe.w_w_max]
            fkey = ("flight", p, v, m)
            flights = self._cache.get(fkey)
            if flights is None:
                flights = self._cache[fkey] = [in_flight_per_chunk(p, v, m, r) for r in range(p)]
            # Ranks of equal composition have equal costs, and the lowest holds the most micro-batches
            # in flight, so it alone can set the step time and the memory peak of its group.
            ranks = pipe.reps
        usable = self.hw.usable_memory_bytes
        logits = 4 * lay.micro_batch_size * lay.seq_len / lay.cp * self.model.vocab_size / lay.vocab_shards
        per_chunk = max(1, d.layers_per_chunk)
        window = self.opt.swap_window if lay.swap else 0
        full = lay.recompute == "full"
        extras = self._group_extras(lay, d, pipe)
        ends, mems, dps = {}, {}, {}
        for r in ranks:
            g = grp[r]
            grad, gather, opt, st = extras[g]
            dps[r] = (grad, gather, opt)
            ends[r] = finish[r] + grad + opt + gather
            act = tl.peak_live[r] if tl is not None else sum(n * a for n, a in zip(flights[r], pipe.act[g]))
            if m > 1 and (lay.fb_overlap or (p == 1 and self.opt.fb_overlap)):
                # the runtime's pairing (parallel/fb_overlap.py, pipeline_overlap.py) keeps one
                # (micro-batch, chunk) more in flight than 1F1B: a forward runs beside a backward
                act += max(pipe.act[g])
            transient = (pipe.act_full[g] if full else 0.0) / per_chunk + window * pipe.swapped[g] / per_chunk
            if r == p - 1:  # the fp32 logits' gradient (vocab-parallel: this rank's slice)
                transient += logits
            mems[r] = (st.total + act + transient, st, act, transient)
        crit = max(ends, key=ends.__getitem__)
        step = ends[crit]
        tokens = lay.global_batch_size * lay.seq_len
        flops_tok = self._flops_per_token(lay.seq_len)
        tok_s = tokens / step
        peak_rank = max(mems, key=lambda r: mems[r][0])
        peak, st, act, transient = mems[peak_rank]
        memory = {"weights": st.weights, "grads": st.grads, "optimizer": st.optimizer,
                  "optimizer_host": st.optimizer_host, "activations": act,
                  "transient": transient, "total": peak}
        est = Estimate(layout=lay, derived=d, step_time=step, tokens_per_s=tok_s,
                       mfu=flops_tok * tok_s / (self.num_devices * self.peak), breakdown={},
                       memory=memory, peak_memory=peak, fits=peak <= usable, hardware=self.hw.name,
                       model_flops_per_token=flops_tok, timeline=tl,
                       stage_memory=[mems[r][0] for r in sorted(mems)] if tl is not None else [],
                       stage_activations=[mems[r][2] for r in sorted(mems)] if tl is not None else [],
                       mfu_by_convention={c: f * tok_s / (self.num_devices * self.peak)
                                          for c, f in self._convention_flops(lay.seq_len).items()},
                       tokens_per_s_per_device=tok_s / self.num_devices, peak_flops_per_s=self.peak)
        self._attach_band(est, lay, d)
        if timeline:
            self._attribute_to_busiest(est, chunks, finish, dps)
        return est

    def _attach_band(self, est: Estimate, lay: Layout, d: Derived) -> None:
        """The error band the profile's validation residuals give a layout with these features."""
        band = band_for(layout_features(
            tp=lay.tp, ep=d.ep, dp=d.dp, pp=lay.pp, vpp=lay.vpp, cp=lay.cp, tp_extend_ep=lay.tp_extend_ep,
            dispatcher=lay.dispatcher, zero1=lay.zero1, recompute=lay.recompute, swap=lay.swap,
            optimizer_offload=lay.optimizer_offload, rank_order=lay.rank_order), self.hw.error_bands)
        if band is not None:
            est.error_band_pct, est.unvalidated = band[:2], band[2]
            est.step_time_band = step_time_interval(est.step_time, *band[:2])

    def _attribute_to_busiest(self, est: Estimate, chunks: list, finish: list, dps: dict) -> None:
        """Attribute the step to the busiest stage, the one that bounds the pipeline: the rank that
        finishes last is often a light one (the first stage waits for all backwards), whose
        "bubble" would then hide the heavy stages' work."""
        lay, d, step = est.layout, est.derived, est.step_time
        p, v, m = lay.pp, lay.vpp, d.micro_batches
        per_rank = [step_breakdown(chunks, p, v, m, r, finish[r], dps[r], step) for r in range(p)]
        busy = [sum(b[k] for k in BUSY_KINDS) for b in per_rank]
        heavy = max(range(p), key=busy.__getitem__)
        b = per_rank[heavy]
        b["bubble"] = max(0.0, step - busy[heavy] - b["dp_comm"] - b["optimizer"])
        est.breakdown, est.critical_stage, est.stage_busy = b, heavy, busy
        est.ops = self._op_breakdown(lay, d, heavy, m)

    def _group_extras(self, lay: Layout, d: Derived, pipe: PipeSums) -> list:
        """Per rank group: exposed gradient reduction, exposed parameter gather, optimizer step, and
        the model states in memory (they depend on the layout only through these keys)."""
        key = (d.dp, d.edp, lay.zero1, lay.optimizer_offload)
        hit = pipe.extras.get(key)
        if hit is None:
            o, hit = self.opt, []
            for g, (dense, expert) in enumerate(pipe.params):
                grad, gather, opt = self._dp_times(lay, d, dense, expert, pipe.tensors[g])
                grad = max(0.0, grad - pipe.b_w[g]) if o.overlap_grad_reduce else grad
                gather = max(0.0, gather - pipe.f_w[g]) if o.overlap_param_gather else gather
                hit.append((grad, gather, opt, self.states(lay, d, dense, expert)))
            pipe.extras[key] = hit
        return hit

    def _flops_per_token(self, seq_len: int) -> float:
        key = ("flops", seq_len)
        if key not in self._cache:
            self._cache[key] = acc.model_flops_per_token(self.model, seq_len, self.opt.include_mtp_flops)
        return self._cache[key]

    def _convention_flops(self, seq_len: int) -> dict[str, float]:
        """Training FLOPs per token under each published convention; "ultramoe" is the one `mfu` uses."""
        key = ("conventions", seq_len)
        if key not in self._cache:
            flops = {c: flops_per_token(self.model, seq_len, c) for c in CONVENTIONS}
            flops["ultramoe"] = self._flops_per_token(seq_len)
            self._cache[key] = flops
        return self._cache[key]

    def _op_breakdown(self, lay: Layout, d: Derived, r: int, m: int) -> dict:
        """Per-step seconds (forward + backward) of each operator on pipeline rank r."""
        out: dict[str, float] = {}
        layers = self.chunk_layers(lay, d)
        for c in range(lay.vpp):
            for kind, n in zip(KINDS, layers[c * lay.pp + r]):
                if not n or kind == "noop":
                    continue
                for op in self.layer_cost(kind, lay, d).ops:
                    out[op.name] = out.get(op.name, 0.0) + m * n * (op.fwd + op.bwd)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
