"""Memory policies (issue 12): the `memory:` config's rules, recomputation and swap giving the
policy-free run's losses and gradients bitwise on CPU (same math), and the measured saved
activation bytes falling by >= 70% with selective recompute + swap on a Pangu-like tiny model
(MLA, sigmoid routing with aux-loss-free bias, shared expert, sandwich norm, MTP)."""
from __future__ import annotations

import pytest
import torch

from config import ConfigError
from moe_kernels import get_kernels
from launch.trainer.recipe import load_recipe
from moe.config import ModelConfig
from moe.model import MoETransformer
from parallel.memory import MemoryManager
from parallel.memory_config import MemoryConfig, simulator_policy

PANGU = dict(vocab_size=256, hidden_size=64, num_layers=3, max_seq_len=64, num_heads=4, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, dense_ffn_size=128,
             first_k_dense=1, num_experts=8, top_k=2, expert_ffn_size=32, num_shared_experts=1,
             score_func="sigmoid", expert_bias=True, bias_update_speed=0.01, norm="sandwich", mtp_layers=1)
SELECTIVE = ["norm", "swiglu", "mla_up"]
SWAP_ALL = ["attention", "expert_ffn", "mlp"]
RECIPE = "configs/recipes/tiny_cpu.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only contend on the shared cores (30x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(cfg: MemoryConfig, steps: int = 2, model_overrides: dict | None = None) -> dict:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**{**PANGU, **(model_overrides or {})}), get_kernels("fast"))
    mm = MemoryManager(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    out = {"loss": [], "grads": [], "load": [], "metrics": []}
    for _ in range(steps):
        tokens = torch.randint(0, PANGU["vocab_size"], (2, 33), generator=g)
        with mm.step(model):
            res = model(tokens[:, :-1], tokens[:, 1:])
            res.loss.backward()
        out["loss"].append(res.loss.detach())
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        out["load"].append([m.router.load_since_update.clone() for m in model.moe_layers()])
        out["metrics"].append(mm.metrics(model, opt))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


_REF = {}


def reference() -> dict:
    if not _REF:
        _REF.update(train(MemoryConfig()))
    return _REF


def assert_bitwise(got: dict, ref: dict) -> None:
    for step, (a, b) in enumerate(zip(got["loss"], ref["loss"])):
        assert torch.equal(a, b), f"step {step}: loss {a} vs {b}"
        for name, g in ref["grads"][step].items():
            assert torch.equal(got["grads"][step][name], g), f"step {step}: gradient of {name} differs"
        for a_load, b_load in zip(got["load"][step], ref["load"][step]):
            assert torch.equal(a_load, b_load), "router token counts differ (a recomputation counted twice?)"
    for name, p in ref["params"].items():
        assert torch.equal(got["params"][name], p), name


@pytest.mark.parametrize("cfg", [
    MemoryConfig(recompute=["norm"]), MemoryConfig(recompute=["swiglu"]), MemoryConfig(recompute=["mla_up"]),
    MemoryConfig(recompute=["core_attention"]), MemoryConfig(recompute=["expert_ffn"]),
    MemoryConfig(recompute=["moe_permute"]), MemoryConfig(recompute=["layer"]), MemoryConfig(full_layers=2),
    MemoryConfig(recompute=["norm", "swiglu", "mla_up", "core_attention", "expert_ffn"]),
    MemoryConfig(swap=SWAP_ALL), MemoryConfig(swap=["core_attention"], recompute=["norm", "swiglu"]),
    MemoryConfig(recompute=SELECTIVE, swap=SWAP_ALL, full_layers=1),
    MemoryConfig(recompute=SELECTIVE + ["moe_permute"], swap=["attention", "mlp"], full_layers=1),
], ids=lambda c: "+".join(c.recompute + [f"full{c.full_layers}"] * bool(c.full_layers) + [f"swap-{s}" for s in c.swap]))
def test_policy_gives_bitwise_the_policy_free_run(cfg):
    got = train(cfg)
    ref = reference()
    assert_bitwise(got, ref)
    peak, base = got["metrics"][-1]["mem_saved_activation_peak_bytes"], ref["metrics"][-1]["mem_saved_activation_peak_bytes"]
    assert peak < base, f"{cfg}: saved bytes at peak {peak} not below the policy-free {base}"
    assert (got["metrics"][-1]["mem_swapped_bytes"] > 0) == bool(cfg.swap)


def test_selective_recompute_and_swap_save_70_percent_of_activation_bytes():
    got = train(MemoryConfig(recompute=SELECTIVE, swap=SWAP_ALL), steps=1)
    m, base = got["metrics"][0], reference()["metrics"][0]
    saved = 1 - m["mem_saved_activation_peak_bytes"] / base["mem_saved_activation_peak_bytes"]
    assert saved >= 0.70, f"saved only {saved:.1%} of the activation bytes at peak"
    # what was swapped is no longer counted on the device, and was really copied
    assert 0 < m["mem_swapped_bytes"] < base["mem_saved_activation_peak_bytes"]


def test_moe_permute_drops_exactly_the_permuted_tokens():
    """The grouped GEMM's input (top_k rows of hidden_size per token, fp32, in each MoE layer and
    the MTP block's) is neither saved nor alive between forward and backward; nothing else moves
    by more than the region's few routing inputs (checkpoint keeps them)."""
    import gc
    import weakref
    for cfg, alive in ((MemoryConfig(), True), (MemoryConfig(recompute=["moe_permute"]), False)):
        torch.manual_seed(0)
        model = MoETransformer(ModelConfig(**PANGU), get_kernels("fast"))
        mm = MemoryManager(model, cfg)
        refs = []
        for m in model.moe_layers():
            def up(x_ND, counts, inner=m.experts.up):
                refs.append(weakref.ref(x_ND))
                return inner(x_ND, counts)
            m.experts.up = up
        tokens = torch.randint(0, PANGU["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(1))
        with mm.step(model):
            res = model(tokens[:, :-1], tokens[:, 1:])
            gc.collect()
            assert len(refs) == 3 and all((r() is not None) == alive for r in refs), (cfg.recompute, refs)
            res.loss.backward()
        if alive:
            base = mm.tracker.peak
    n_moe = PANGU["num_layers"] - PANGU["first_k_dense"] + PANGU["mtp_layers"]
    expected = n_moe * 2 * 32 * PANGU["top_k"] * PANGU["hidden_size"] * 4
    dropped = base - mm.tracker.peak
    assert abs(dropped - expected) <= 0.05 * expected, (dropped, expected)


def test_measured_state_bytes():
    m = reference()["metrics"][-1]
    model = MoETransformer(ModelConfig(**PANGU), get_kernels("fast"))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert m["mem_param_bytes"] == params and m["mem_grad_bytes"] == params  # fp32 weights and gradients
    n = sum(1 for _ in model.parameters())  # AdamW: two moments and a 4-byte step count per parameter
    assert m["mem_optimizer_device_bytes"] == 2 * params + 4 * n and m["mem_optimizer_host_bytes"] == 0
    assert m["mem_peak_rss_bytes"] > params


def test_gqa_core_attention_recompute_and_swap():
    gqa = dict(attention="gqa", num_kv_heads=2, head_dim=16)
    ref = train(MemoryConfig(), steps=1, model_overrides=gqa)
    got = train(MemoryConfig(recompute=["core_attention"], swap=["attention"]), steps=1, model_overrides=gqa)
    assert_bitwise(got, ref)


@pytest.mark.parametrize("overrides, message", [
    ({"memory.recompute": ["nrom"]}, "memory.recompute[0]: got 'nrom'; allowed: one of 'norm'"),
    ({"memory.swap": ["core_attention"], "memory.recompute": ["mla_up"]},
     "memory.swap: 'core_attention' swaps tensors that recompute 'mla_up' already drops"),
    ({"memory.swap": ["expert_ffn"], "memory.recompute": ["expert_ffn"]},
     "memory.swap: 'expert_ffn' swaps tensors that recompute 'expert_ffn' already drops"),
    ({"memory.swap": ["mlp"], "memory.recompute": ["layer"]}, "memory.swap: 'mlp' swaps tensors that recompute 'layer'"),
    ({"memory.swap": ["expert_ffn"], "memory.recompute": ["moe_permute"]},
     "memory.swap: 'expert_ffn' swaps tensors that recompute 'moe_permute' already drops"),
    ({"memory.recompute": ["expert_ffn", "moe_permute"]},
     "memory.recompute: 'moe_permute' and 'expert_ffn' both recompute the experts' up-projections"),
    ({"memory.recompute": ["moe_permute"], "model.first_k_dense": 4, "model.mtp_layers": 0},
     "memory.recompute: 'moe_permute' needs MoE layers"),
    ({"memory.swap": ["attention"], "memory.full_layers": 4}, "memory.swap: every layer is recomputed whole"),
    ({"memory.full_layers": 5}, "memory.full_layers: 5 exceeds the 4 layers of a pipeline stage"),
    ({"memory.full_layers": -1}, "memory.full_layers: must be >= 0"),
    ({"memory.recompute": ["mla_up"], "model.attention": "gqa", "model.num_kv_heads": 2, "model.head_dim": 32},
     "memory.recompute: 'mla_up' needs model.attention: mla"),
    ({"memory.optimizer_offload": True, "memory.host_optimizer": "deepspeed"},
     "memory.host_optimizer: 'deepspeed' needs the deepspeed extra"),
    ({"memory.host_optimizer": "torch"}, "memory.host_optimizer: 'torch' only applies with optimizer_offload: true"),
    ({"memory.offload_chunk_mb": 0}, "memory.offload_chunk_mb: must be > 0"),
])
def test_bad_combinations_are_one_clear_error(overrides, message):
    from parallel.memory_config import deepspeed_available
    if "deepspeed" in message and deepspeed_available():
        overrides = {**overrides, "memory.optimizer_offload": False}  # then the rule left is host_optimizer's
        message = "memory.host_optimizer: 'deepspeed' only applies with optimizer_offload: true"
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPE, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_simulator_policies_are_runtime_configs():
    from simulator.layout import Layout
    sel = Layout(recompute="selective", swap=True, optimizer_offload=True).memory()
    assert sel.recompute == SELECTIVE and sel.swap == ["attention", "expert_ffn"] and sel.optimizer_offload
    assert sel.summary() == ("selective", True, True)
    assert Layout(recompute="full", swap=True).memory().swap == []  # nothing is left to swap
    for rec in ("none", "selective", "full"):
        for swap in (False, True):
            cfg = simulator_policy(rec, swap, False)
            assert cfg.summary()[0] == rec and cfg.summary()[1] == (swap and rec != "full")
    # a recipe's memory section names the coarse policy the simulator costs
    assert load_recipe(RECIPE, {"memory.recompute": ["norm"], "memory.swap": ["attention"]}).memory.summary() == \
        ("selective", True, False)
