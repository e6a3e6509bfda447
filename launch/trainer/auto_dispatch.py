"""`parallel.dispatcher: auto` in the trainer: resolved to a named dispatcher before the runtime
exists, so every rank parallelizes the model the same way (each computes the same prediction from
the same recipe; nothing is communicated). The choice is the simulator's
(simulator/dispatch_choice.py); the training log gets its one line with every candidate's
predicted time. The run then trains and checkpoints with the named dispatcher, as if the recipe
had said it (the recipe object is copied, not changed).

Not done: revising the choice after warm-up steps from the measured expert load (the runtime
cannot swap a layer's dispatcher mid-run yet).
"""
from __future__ import annotations

from dataclasses import replace

from launch.trainer.recipe import Recipe
from parallel.device import resolve_device_type


def resolve_dispatcher(recipe: Recipe, world: int, log: bool = True) -> Recipe:
    """`recipe` with `parallel.dispatcher: auto` replaced by the predicted-fastest dispatcher for
    `world` ranks (printed when `log`); any other recipe is returned as it is."""
    par = recipe.parallel
    if par.dispatcher != "auto":
        return recipe
    from simulator.dispatch_choice import choose_dispatcher  # the simulator only when asked
    t = recipe.train
    par.validate("parallel")
    choice = choose_dispatcher(recipe.model, par, world, t.micro_batch_size, t.seq_len, device=resolve_device_type(t.device),
                               dtype=t.dtype, micro_batches=t.grad_accum)
    if log:
        print(choice.log_line(), flush=True)
    return replace(recipe, parallel=replace(par, dispatcher=choice.dispatcher, dispatcher_profile=None))
