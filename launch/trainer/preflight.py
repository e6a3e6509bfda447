"""Start-up checks of everything outside the recipe file: the device, the tokenizer, the dataset
files, the index cache directory and the split. `preflight(recipe)` runs once, before the process
group starts and before the model is built (the README promises validation "as a whole before
anything runs"), so each problem is one ConfigError naming the field and the fix, on every rank,
instead of a traceback minutes into a launch. It reads only file headers and the .idx (plus the
first 64 MiB of tokens); Megatron itself is not imported here.
"""
from __future__ import annotations

import os
import sys

import torch

from config import ConfigError
from launch.data.indexed import DataError, check_split, check_token_ids, read_index
from launch.data.tokenizer import TokenizerError, load_tokenizer
from launch.trainer.recipe import Recipe
from parallel import device as devices
from parallel.runtime import validate_layout

__all__ = ["preflight"]


def preflight(recipe: Recipe) -> None:
    """Raise ConfigError for the first unusable device, tokenizer, dataset or split; print a note
    (rank 0) when one step reads more samples than the train split holds."""
    t, d = recipe.train, recipe.data
    _check_device(t.device)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if rank == 0:
        _note_slow_bf16(t.dtype, t.device)
    dp = validate_layout(recipe.parallel, recipe.model, world).dp
    tokenizer = _field("data.tokenizer", lambda: load_tokenizer(d.tokenizer), (TokenizerError, OSError))
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {recipe.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; raise vocab_size to at least {tokenizer.vocab_size}")
    _check_writable_dir("data.cache_dir", d.cache_dir)
    if d.path == "embedded":
        from launch.data.datasets import ensure_embedded_dataset
        prefix = ensure_embedded_dataset(d.cache_dir, num_docs=d.embedded_docs)
    else:
        prefix = d.path
    info = _field("data.path", lambda: read_index(os.path.abspath(prefix)), DataError)
    _field("data.path", lambda: check_token_ids(info, tokenizer.vocab_size), DataError)
    # The final evaluation always runs (eval_batches >= 1), so the valid split must have tokens.
    train_tokens = _field("data.split", lambda: check_split(info.lengths, d.split, True, prefix), DataError)
    per_step = t.micro_batch_size * t.grad_accum * dp * t.seq_len
    if per_step > train_tokens and rank == 0:
        print(f"note: one step reads {per_step} tokens but the train split of {prefix} holds "
              f"{train_tokens}: each step repeats the data {per_step / train_tokens:.1f} times; use more "
              "data or a smaller train.micro_batch_size", file=sys.stderr, flush=True)


def _field(name: str, check, errors):
    """check(), with its error turned into one ConfigError line naming `name`."""
    try:
        return check()
    except errors as err:
        raise ConfigError(f"{name}: {' '.join(str(err).split())}") from None


def _check_device(requested: str) -> None:
    if requested == "npu" and not devices.npu_available():
        why = "torch_npu is not installed" if devices.import_torch_npu() is None else "torch_npu sees no NPU"
        raise ConfigError(f"train.device: npu, but {why}; install the npu extra (pip install 'ultramoe[npu]') "
                          "and the CANN toolkit on an Ascend host, or set train.device: cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but no CUDA device is visible; set train.device: cpu or auto")


def _note_slow_bf16(dtype: str, device: str) -> None:
    """bf16 on a CPU without a native bf16 GEMM (no AVX512-BF16 / AMX): torch falls back to a
    scalar loop there (1-16 GFLOP/s against 110-176 for fp32 on the 2-core AVX2 development VM).
    The expert GEMMs run in fp32 anyway (moe_kernels/fast.py); every other matmul does not."""
    from moe_kernels.fast import native_bf16_gemm
    if dtype == "bf16" and devices.resolve_device_type(device) == "cpu" and not native_bf16_gemm("cpu"):
        print("note: train.dtype: bf16 on a CPU without native bf16 matrix units (no AVX512-BF16/AMX): "
              "its bf16 matmuls are emulated and several times slower than fp32; train.dtype: fp32 is faster "
              "here", file=sys.stderr, flush=True)


def _check_writable_dir(name: str, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{name}: cannot create {path} ({err.strerror}); point {name} at a writable "
                          "directory") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{name}: {path} is not writable; point {name} at a writable directory")
