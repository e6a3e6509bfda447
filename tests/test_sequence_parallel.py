"""Sequence parallelism (parallel/sequence_parallel.py) beyond loss equivalence, which
tests/test_parallel_tp.py, tests/test_pipeline.py and tests/test_memory_dist.py check: the work
outside the TP regions really runs on S / tp positions, a region's gathered input is not kept for
backward (its projections keep this rank's part and re-gather it), and the simulator's activation
formulas predict the measured bytes of the sequence-parallel validate cases within 10 %.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _shapes_and_bytes(sequence_parallel: bool) -> dict:
    from test_parallel_equivalence import build, global_batches
    from parallel.config import ParallelConfig
    from parallel.memory import MemoryManager
    from parallel.memory_config import MemoryConfig
    from parallel.runtime import ParallelRuntime
    model = build({})
    rt = ParallelRuntime.setup(ParallelConfig(tp=2, dispatcher="local", sequence_parallel=sequence_parallel), model.cfg)
    rt.parallelize(model)
    seen = {}

    def record(name, x):
        seen.setdefault(name, tuple(x.shape))  # returns None: a forward hook's value would replace the output

    for name in ("layers.0.attn_norm", "layers.1.mlp_norm", "mtp.0.block.attn_norm", "norm"):
        model.get_submodule(name).register_forward_hook(
            lambda _m, args, _out, name=name: record(name, args[0]))
    router = model.get_submodule("layers.1.mlp.router")
    router.register_forward_hook(lambda _m, args, _out: record("router", args[0]))
    mm = MemoryManager(model, MemoryConfig())
    tokens = global_batches()[0]
    with mm.step(model):
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    seen["saved"] = mm.tracker.peak
    return seen


def test_layers_run_on_a_slice_of_the_positions_and_the_head_on_whole_sequences():
    from test_parallel_equivalence import BASE_MODEL, GLOBAL_BATCH, SEQ
    b, d = GLOBAL_BATCH, BASE_MODEL["hidden_size"]
    sp = run_distributed(_shapes_and_bytes, 2, True)[0]
    plain = run_distributed(_shapes_and_bytes, 2, False)[0]
    assert sp["layers.0.attn_norm"] == (b, SEQ // 2, d) and plain["layers.0.attn_norm"] == (b, SEQ, d)
    assert sp["layers.1.mlp_norm"] == (b, SEQ // 2, d)
    assert sp["router"] == (b * SEQ // 2, d) and plain["router"] == (b * SEQ, d)
    assert sp["norm"] == (b, SEQ, d)  # the final norm and head see whole sequences
    assert sp["mtp.0.block.attn_norm"] == (b, SEQ - 1, d)  # MTP blocks are not split
    assert sp["saved"] < plain["saved"]


def _gathered_input_kept(regather: bool) -> int:
    """Saved bytes of one sequence-parallel SwiGLU region's forward, with the re-gather on or off."""
    import torch.distributed as dist
    from parallel.memory import SavedTracker
    from parallel.tensor_parallel import apply_tensor_parallel
    from moe.layers import SwiGLU
    torch.manual_seed(0)
    mlp = SwiGLU(64, 128)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([mlp])  # a region of the main layers
    apply_tensor_parallel(holder, dist.group.WORLD, dist.get_rank(), 2, sequence_parallel=True)
    if not regather:
        for lin in (mlp.w1, mlp.w3):
            lin.forward = lin.forward.inner
    tracker = SavedTracker()
    tracker.reset(mlp)
    x = torch.randn(256, 64, requires_grad=True)
    with tracker.hooks():
        y = mlp(x)
    peak = tracker.peak
    y.sum().backward()
    return peak


def test_region_keeps_its_part_of_the_gathered_input_not_the_whole():
    with_regather = run_distributed(_gathered_input_kept, 2, True)[0]
    without = run_distributed(_gathered_input_kept, 2, False)[0]
    # Both keep this rank's part (the region holds it until its forward ends); without the
    # re-gather the projections also keep the gathered fp32 rows of both ranks.
    gathered = 2 * 256 * 64 * 4
    assert without - with_regather == gathered, (without, with_regather)


@pytest.mark.timeout(300)
def test_simulator_predicts_the_sequence_parallel_memory_cases():
    from simulator.validate_memory import run_memory_validation
    rows = run_memory_validation(ROOT / "configs/hardware/cpu_calibrated.yaml", ROOT / "configs/simulator/validate_cpu.yaml",
                                 only=["mem-tp2-sp", "mem-tp2-sp-selective-swap", "mem-tp2-extend-sp"], log=lambda _: None)
    assert len(rows) == 3
    for row in rows:
        assert row["pass"], row


@pytest.mark.parametrize("overrides, message", [
    ({"parallel.sequence_parallel": True}, "parallel.sequence_parallel: splits the tokens over the TP ranks, but tp=1"),
    ({"parallel.sequence_parallel": True, "parallel.tp": 2, "train.seq_len": 63},
     "parallel.sequence_parallel: train.seq_len=63 does not split evenly over tp=2 ranks"),
    ({"parallel.sequence_parallel": True, "parallel.tp": 2, "model.capacity_factor": 1.25},
     "parallel.sequence_parallel: model.capacity_factor=1.25 drops tokens by their order"),
])
def test_bad_sequence_parallel_recipe_is_one_clear_error(overrides, message):
    from config import ConfigError
    from launch.trainer.recipe import load_recipe
    from parallel.config import check_runtime_support
    with pytest.raises(ConfigError) as e:
        recipe = load_recipe(ROOT / "configs/recipes/tiny_cpu.yaml", overrides)
        check_runtime_support(recipe.parallel)
    assert str(e.value).startswith(message), str(e.value)


def _uneven_split_message() -> str:
    import torch.distributed as dist
    from parallel.sequence_parallel import split_sequence
    try:
        split_sequence(torch.zeros(1, 5, 4), dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return "no error"


def test_runtime_refuses_a_sequence_that_does_not_split_evenly():
    """The recipe check aside (above), the runtime never drops positions silently."""
    msg = run_distributed(_uneven_split_message, 2)[0]
    assert msg.startswith("sequence parallelism: a sequence of 5 positions does not split evenly over tp=2"), msg
