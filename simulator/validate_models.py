"""`simulate validate --models`: the model search checked by training, as the Pangu team checked
theirs. Every model shape of a small space within a parameter budget is costed on this machine's
profile; the predicted best few and a few poor ones are trained by the real trainer (the same
worker `validate` runs, one process) and the report compares predicted with measured tokens/s:
their rank correlation (Spearman) and how far the predicted best falls short of the measured best.

Predictions use the profile scaled by the speed probe read during each run (as `validate` does),
so the ranking compares the cost model, not the shared machine's drift; the calibration-only
prediction is reported beside it.
"""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from config import ConfigError, from_dict, load_yaml
from moe.config import ModelConfig
from simulator.hardware import load_hardware
from simulator.search import ModelSpace
from simulator.validate import ROOT, Case, measure, predict

DEFAULT_MODELS_CONFIG = ROOT / "configs/simulator/validate_models_cpu.yaml"


@dataclass
class ModelCheckConfig:
    model: ModelConfig  # the base shape; the space varies its hyperparameters
    model_space: ModelSpace
    case: Case = field(default_factory=lambda: Case(name="model"))
    best: int = 4  # predicted-best candidates to train
    worst: int = 3  # predicted-worst candidates to train
    steps: int = 9
    warmup_steps: int = 2

    def validate(self, path: str = "") -> None:
        if self.best < 1 or self.worst < 0:
            raise ConfigError(f"best/worst: train at least one predicted-best candidate, got best={self.best}, "
                              f"worst={self.worst}")
        if self.steps <= self.warmup_steps:
            raise ConfigError(f"steps: must exceed warmup_steps={self.warmup_steps}, got {self.steps}")
        if self.case.world != 1:
            raise ConfigError("case.world: the model check trains one process per candidate; set world: 1")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else 0.0


def pick(ranked: list, best: int, worst: int) -> list:
    """The first `best` and the last `worst` of a ranking, without repeats."""
    return ranked[:best] + ranked[max(best, len(ranked) - worst):]


def run_model_check(hw_path, config=DEFAULT_MODELS_CONFIG, workdir: Optional[Path] = None,
                    log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    hw = load_hardware(hw_path)
    if hw.device != "cpu" or not hw.speed_probe:
        raise ConfigError(f"hardware: the model check trains on this machine's CPU; give a calibrated CPU profile "
                          f"(`python -m simulator calibrate`), not {hw.name!r}")
    cfg = from_dict(ModelCheckConfig, load_yaml(config), "model check")
    c = cfg.case
    tokens = c.micro_batch_size * c.seq_len * c.grad_accum
    cands = []
    for model, pc in cfg.model_space.candidates(cfg.model):
        model.validate("model")
        pred = predict(model, hw, c)["step_time_s"]
        cands.append((tokens / pred, model, pc))
    cands.sort(key=lambda t: -t[0])
    ranked = [(i + 1, *t) for i, t in enumerate(cands)]
    chosen = pick(ranked, cfg.best, cfg.worst)
    log(f"{len(cands)} model shapes within budget; training the predicted best {cfg.best} and worst "
        f"{min(cfg.worst, len(cands) - cfg.best)} ({cfg.steps} steps each)")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="simmodels-"))
    rows = []
    for rank, raw_tok_s, model, pc in chosen:
        name = f"h{model.hidden_size}-l{model.num_layers}-e{model.num_experts}k{model.top_k}-f{model.expert_ffn_size}"
        meas = measure(model, replace(c, name=name), cfg.steps, cfg.warmup_steps, max(1, hw.cpu_threads), workdir)
        row = {"model": name, "total_params_m": pc.total / 1e6, "activated_params_m": pc.activated / 1e6,
               "predicted_rank": rank,
               "calibration_only_tokens_per_s": raw_tok_s}
        if "error" in meas:
            row.update(predicted_tokens_per_s=None, measured_tokens_per_s=None, note=meas["error"])
        else:
            slowdown = meas["probe_s"] / hw.speed_probe
            pred = predict(model, hw, c, slowdown=slowdown)["step_time_s"]
            row.update(predicted_tokens_per_s=tokens / pred, measured_tokens_per_s=tokens / meas["step_time_s"],
                       machine_slowdown=slowdown, note="")
        rows.append(row)
        log(f"  {name:<28} predicted rank {row['predicted_rank']:>3}: "
            + (f"predicted {row['predicted_tokens_per_s']:,.0f} tokens/s, measured {row['measured_tokens_per_s']:,.0f}"
               if row["measured_tokens_per_s"] else f"not measured: {row['note']}"))
    return rows, summarize_models(rows)


def summarize_models(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("measured_tokens_per_s")]
    if len(ok) < 2:
        return {"trained": len(ok), "rank_correlation": None, "best_shortfall_pct": None, "pass": False}
    pred = [r["predicted_tokens_per_s"] for r in ok]
    meas = [r["measured_tokens_per_s"] for r in ok]
    raw = [r["calibration_only_tokens_per_s"] for r in ok]
    predicted_best = max(ok, key=lambda r: r["predicted_tokens_per_s"])
    shortfall = 100 * (1 - predicted_best["measured_tokens_per_s"] / max(meas))
    rho = spearman(pred, meas)
    return {"trained": len(ok), "rank_correlation": rho, "calibration_only_rank_correlation": spearman(raw, meas),
            "predicted_best": predicted_best["model"], "measured_best": max(ok, key=lambda r: r["measured_tokens_per_s"])["model"],
            "best_shortfall_pct": shortfall, "pass": len(ok) >= 6 and rho >= 0.9 and shortfall <= 5.0}
