"""`parallel.dispatcher: auto` (simulator/dispatch_choice.py, launch/trainer/auto_dispatch.py).

- Cases whose answer is clear by byte counting: very slow inter-node links at top-4 over 2 nodes ->
  hierarchical (it sends a token across once per node, all-to-all top-k times); top-1 of 16 on one
  slow node -> alltoall (all-gather sends every token to every rank); top-8 of 16 over ep = 2 ->
  allgather (all-to-all sends 8 copies, all-gather one); ep = 1 -> local; a layout the hierarchical
  dispatcher cannot run (expert TP) does not get it, and says why.
- Bad input is one ConfigError naming the field.
- The trainer resolves `auto` before the runtime exists and logs the choice (a single-process run
  through build_context), and the runtime refuses an unresolved `auto`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from config import ConfigError
from moe.config import ModelConfig
from parallel.config import EmulateLinks, LinkSpec, ParallelConfig, check_runtime_support
from simulator.dispatch_choice import choose_dispatcher

ROOT = Path(__file__).resolve().parents[1]


def _model(experts: int = 16, top_k: int = 4, hidden: int = 128, seq: int = 128) -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=hidden, num_layers=3, first_k_dense=1, max_seq_len=seq,
                       num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=32, dense_ffn_size=512, num_experts=experts, top_k=top_k,
                       expert_ffn_size=128, num_shared_experts=1)


def _links(intra_gbps: float, inter_gbps: float) -> EmulateLinks:
    return EmulateLinks(intra_node=LinkSpec(10.0, intra_gbps), inter_node=LinkSpec(50.0, inter_gbps))


def test_slow_inter_node_link_picks_hierarchical():
    par = ParallelConfig(ep=4, devices_per_node=2, dispatcher="auto", emulate_links=_links(1.0, 0.002))
    c = choose_dispatcher(_model(top_k=4), par, 4, 4, 128)
    assert c.dispatcher == "hierarchical"
    assert c.predicted_s["hierarchical"] < 0.7 * c.predicted_s["alltoall"], c.predicted_s
    line = c.log_line()
    assert "auto -> hierarchical" in line and "alltoall" in line and "allgather" in line and "0.002 GB/s" in line


def test_top1_on_one_slow_node_picks_alltoall():
    par = ParallelConfig(ep=4, devices_per_node=4, dispatcher="auto", emulate_links=_links(0.01, 0.01))
    c = choose_dispatcher(_model(top_k=1), par, 4, 4, 128)
    # inside one node the hierarchical dispatcher is the all-to-all: a tie, broken towards alltoall
    assert c.predicted_s["hierarchical"] == c.predicted_s["alltoall"]
    assert c.dispatcher == "alltoall"
    assert c.predicted_s["allgather"] > 2 * c.predicted_s["alltoall"], c.predicted_s


def test_many_copies_per_token_picks_allgather():
    par = ParallelConfig(ep=2, devices_per_node=2, dispatcher="auto", emulate_links=_links(0.01, 0.01))
    c = choose_dispatcher(_model(top_k=8), par, 2, 4, 128)
    assert c.dispatcher == "allgather"
    assert c.predicted_s["allgather"] < 0.5 * c.predicted_s["alltoall"], c.predicted_s


def test_ep1_is_local_and_expert_tp_rules_out_hierarchical():
    c = choose_dispatcher(_model(), ParallelConfig(ep=1, dispatcher="auto"), 1, 4, 128)
    assert c.dispatcher == "local" and c.predicted_s == {} and "ep = 1" in c.log_line()
    par = ParallelConfig(tp=2, ep=2, devices_per_node=2, dispatcher="auto", emulate_links=_links(1.0, 0.002))
    c = choose_dispatcher(_model(), par, 4, 4, 128)
    assert "hierarchical" not in c.predicted_s and "contiguous EP groups" in c.rejected["hierarchical"]
    assert c.dispatcher in ("alltoall", "allgather")


def test_the_hardware_profiles_links_without_emulation():
    # the 910B profile: 8 NPUs per node on HCCS, RoCE between nodes; ep = 64 spans 8 nodes at top-8.
    # Bandwidth-bound (4K tokens of width 4096): all-to-all sends 7 of 8 copies across nodes, the
    # hierarchical one each token to the ~4.6 other nodes that hold one of its experts.
    par = ParallelConfig(ep=64, dispatcher="auto", dispatcher_profile="ascend_910b_a2")
    c = choose_dispatcher(_model(experts=256, top_k=8, hidden=4096, seq=4096), par, 64, 1, 4096, device="npu",
                          dtype="bf16")
    assert c.profile == "ascend_910b_a2" and set(c.predicted_s) == {"alltoall", "hierarchical", "allgather"}
    assert c.dispatcher == "hierarchical", c.predicted_s


@pytest.mark.parametrize("change, field", [
    (dict(world=0), "world size"), (dict(micro_batch_size=0), "train.micro_batch_size"),
    (dict(seq_len=0), "train.seq_len"), (dict(imbalance=0.5), "expert imbalance"),
    (dict(dtype="bf16"), "train.dtype"), (dict(device="tpu"), "parallel.dispatcher_profile"),
])
def test_bad_input_names_the_field(change, field):
    args = dict(world=2, micro_batch_size=4, seq_len=128, device="cpu", dtype="fp32", imbalance=1.0)
    args.update(change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        choose_dispatcher(_model(), ParallelConfig(ep=2, dispatcher="auto"), **args)


def test_bad_config_errors():
    with pytest.raises(ConfigError, match=r"parallel\.dispatcher_profile: hardware: unknown profile 'nope'"):
        choose_dispatcher(_model(), ParallelConfig(ep=2, dispatcher="auto", dispatcher_profile="nope"), 2, 4, 128)
    with pytest.raises(ConfigError, match=r"parallel\.ep: ep = 4 does not divide the 2 ranks"):
        choose_dispatcher(_model(), ParallelConfig(ep=4, dispatcher="auto"), 2, 4, 128)
    with pytest.raises(ConfigError, match=r"dispatcher_profile: only used by dispatcher: auto"):
        ParallelConfig(ep=2, dispatcher="alltoall", dispatcher_profile="cpu_calibrated").validate("parallel")
    with pytest.raises(ConfigError, match=r"parallel\.dispatcher: 'auto' must be resolved"):
        check_runtime_support(ParallelConfig(ep=2, dispatcher="auto"))
    from simulator.layout import Layout, derive
    with pytest.raises(ConfigError, match=r"layout\.dispatcher: 'auto' is the trainer's choice"):
        derive(_model(), Layout(ep=2, dispatcher="auto"), 2, 2)


def test_trainer_resolves_auto_before_the_runtime(tmp_path, capsys):
    from launch.trainer.auto_dispatch import resolve_dispatcher
    from launch.trainer.loop import run
    from launch.trainer.recipe import load_recipe
    over = {"train.steps": 1, "train.micro_batch_size": 2, "train.seq_len": 32, "train.eval_batches": 1,
            "train.tensorboard": False, "train.warmup_steps": 1, "train.out_dir": str(tmp_path / "run"),
            "data.embedded_docs": 300, "data.cache_dir": str(tmp_path / "data"), "parallel.dispatcher": "auto",
            "checkpoint.save_at_end": True, "checkpoint.interval": 0}
    recipe = load_recipe(ROOT / "configs/recipes/tiny_cpu.yaml", over)
    two = replace(recipe, parallel=replace(recipe.parallel, ep=2, devices_per_node=1,
                                           emulate_links=_links(1.0, 0.002)))
    resolved = resolve_dispatcher(two, 2, log=False)
    assert resolved.parallel.dispatcher == "hierarchical" and two.parallel.dispatcher == "auto"
    assert resolve_dispatcher(resolved, 2) is resolved  # a named dispatcher is left alone
    metrics = run(recipe, progress=False, log=True)  # one process: ep = 1
    assert len(metrics) == 1
    assert "dispatcher: auto -> local (ep = 1" in capsys.readouterr().out
    # the checkpoint's recipe names the dispatcher that ran, not 'auto'
    saved = [yaml.safe_load(p.read_text()) for p in (tmp_path / "run").rglob("recipe.yaml")
             if "checkpoints" in p.parts]
    assert saved and all(r["parallel"]["dispatcher"] == "local" for r in saved)
