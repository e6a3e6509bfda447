"""Benchmark: one whole training step (forward + backward + AdamW) of our model against Hugging Face
transformers' DeepseekV3ForCausalLM on the same DeepSeek-V3-compatible tiny config (pre-norm, MLA,
sigmoid routing with a selection bias, group-limited top-k, shared expert, no auxiliary loss,
no MTP), the same batch, the same optimizer settings. Reports tokens/s of each, the ratio, and
the dense matmul peak measured in the same run. Weights are each model's own initialisation with
the same seed: step time does not depend on the values, only on shapes and routing balance (the
expert loads of both are printed so a skewed routing is visible).

    .venv/bin/python bench/bench_train_step.py                # fp32 and bf16 (autocast), ~3 min
    .venv/bin/python bench/bench_train_step.py --dtypes fp32 --repeats 5
    .venv/bin/python bench/bench_train_step.py --isolate --rounds 3   # each contestant in its own process

Contestants alternate step by step in one process by default (drift hits all alike), but then each
one's freed activations are another's fresh pages: on this VM that costs 7k-100k minor page faults
and up to 0.3 s of system time per step, and which model pays varies. `--isolate` runs every
contestant in its own process instead, `--rounds` times in turn, and reports the median over all
their steps.

transformers goes in the `bench` / `dev` extra, never in the runtime's dependencies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe.accounting import model_flops_per_token  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.model import MoETransformer  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=256, num_layers=4, first_k_dense=1, dense_ffn_size=768,
             num_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, num_experts=16, top_k=4, expert_ffn_size=128, num_shared_experts=1, n_group=4,
             topk_group=2, routed_scaling_factor=2.5, max_seq_len=512)


def our_model() -> MoETransformer:
    cfg = ModelConfig(**SHAPE, attention="mla", score_func="sigmoid", norm_topk_prob=True, expert_bias=True,
                      aux_loss_coeff=0.0, z_loss_coeff=0.0, norm="pre", mtp_layers=0, init="standard",
                      tie_embeddings=False)
    cfg.validate("model")
    torch.manual_seed(0)
    return MoETransformer(cfg)


def hf_model(impl: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    s = SHAPE
    cfg = DeepseekV3Config(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["dense_ffn_size"],
        moe_intermediate_size=s["expert_ffn_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_heads"], n_shared_experts=1,
        n_routed_experts=s["num_experts"], num_experts_per_tok=s["top_k"], n_group=s["n_group"],
        topk_group=s["topk_group"], routed_scaling_factor=s["routed_scaling_factor"],
        kv_lora_rank=s["kv_lora_rank"], q_lora_rank=s["q_lora_rank"], qk_rope_head_dim=s["qk_rope_head_dim"],
        qk_nope_head_dim=s["qk_nope_head_dim"], v_head_dim=s["v_head_dim"], first_k_dense_replace=1,
        norm_topk_prob=True, max_position_embeddings=s["max_seq_len"], tie_word_embeddings=False,
        attention_dropout=0.0)
    cfg._experts_implementation = impl
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(cfg)


def make_step(model, loss_of, tokens, labels, dtype: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = loss_of(model, tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def ours_loss(model, tokens, labels):
    return model(tokens, labels).loss


def hf_loss(model, tokens, labels):
    logits = model(input_ids=tokens).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def measure_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn(1024, 1024, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - t))
    return best


def build_step(name: str, tokens, labels, dtype: str):
    if name == "ours":
        return make_step(our_model(), ours_loss, tokens, labels, dtype)
    return make_step(hf_model(name.split(" ", 1)[1]), hf_loss, tokens, labels, dtype)


def isolated_times(names: list[str], dtype: str, args) -> dict:
    """Each contestant's step times from fresh processes, `args.rounds` each, contestants in turn."""
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--only", name, "--dtypes", dtype, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--hf-impls", *args.hf_impls]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times[name] += json.loads(next(l for l in out.splitlines() if l.startswith("TIMES "))[6:])
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--hf-impls", nargs="*", default=["grouped_mm", "eager"])
    ap.add_argument("--isolate", action="store_true", help="each contestant in its own process (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="with --isolate: processes per contestant, in turn")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: --isolate's child measures one contestant
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        sys.exit("transformers is not installed: pip install -e '.[dev]' (it is a bench/dev extra)")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=g)
    labels = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=g)
    ntok = args.batch * args.seq
    ours = our_model()
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"batch {args.batch} x {args.seq} tokens; ours {n_ours / 1e6:.2f} M parameters, "
          f"{model_flops_per_token(ours.cfg, args.seq) / 1e6:.1f} MFLOP/token (train)")
    for dtype in args.dtypes:
        peak = 0.0 if args.only else measure_peak(torch.float32 if dtype == "fp32" else torch.bfloat16)
        names = ["ours"] + [f"HF {impl}" for impl in args.hf_impls]
        if args.only:
            names = [args.only]
        if args.isolate:
            times = isolated_times(names, dtype, args)
        else:
            contestants = {n: build_step(n, tokens, labels, dtype) for n in names}
            times = {k: [] for k in contestants}
            for i in range(args.warmup + args.repeats):
                for name, step in contestants.items():  # alternate: drift hits all alike
                    t = time.perf_counter()
                    step()
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - t)
        if args.only:
            print("TIMES " + json.dumps(times[args.only]))
            return
        med = {k: statistics.median(v) for k, v in times.items()}
        fastest_peer = min((v, k) for k, v in med.items() if k != "ours")
        print(f"{dtype}: dense matmul peak {peak / 1e9:.1f} GFLOP/s")
        for name, t in med.items():
            print(f"  {name:<14} {t * 1e3:8.1f} ms/step  {ntok / t:10,.0f} tokens/s"
                  + ("" if name == "ours" else f"  ours is {t / med['ours']:.2f}x faster"))
        print(f"  ours vs the fastest peer ({fastest_peer[1]}): {fastest_peer[0] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
