"""Training data: Megatron GPT datasets over indexed (.bin/.idx) corpora, and a resumable batcher.

* `build_datasets` opens a prefix written by `launch.prepare_data` (or by Megatron-LM /
  MindSpeed-LLM's preprocessing) through `megatron.core.datasets`: `GPTDatasetConfig`,
  `BlendedMegatronDatasetBuilder` and `GPTDataset`, so samples are drawn exactly as Megatron draws
  them (same document/sample/shuffle indices for the same seed, sequence length and split).
* `ensure_embedded_dataset` builds the built-in synthetic corpus once per directory and reuses it.
* `BatchIterator` turns a dataset into micro-batches; its position is a global sample index so a
  checkpoint can resume exactly, on any data-parallel layout with the same global batch.

Tested with megatron-core 0.16.1 on CPU (torch.distributed initialised or not). Quirks handled here:
* GPTDataset's default index cache is `<prefix>/cache/...`, i.e. it treats the dataset prefix as a
  directory; we always pass `path_to_cache` (default `<dataset dir>/index-cache`).
* A split with no tokens (e.g. 2 % of 10 documents is 0 documents) makes GPTDataset loop forever
  counting epochs, even when 0 samples are requested from it; we check every requested split first
  (`indexed.check_split`) and raise a clear error, and do not build a valid split when no valid
  samples are requested.
* Without torch.distributed every process builds and writes the index cache itself, with plain
  non-atomic `numpy.save`; we serialise that with a file lock so concurrent processes (parallel
  tests, several launches on one box) never read half-written caches. With torch.distributed
  initialised Megatron builds on rank 0 behind a barrier, so `build_datasets` is then a collective:
  call it on every rank.
* Importing megatron.core takes about 5 s (its __init__ imports most of Megatron); it is done
  lazily, with its Apex/Transformer-Engine fallback warnings silenced.
* Megatron loads its index cache with `numpy.load(allow_pickle=True)`, so a pickle planted in the
  cache directory would run code at start-up. Its dataset modules get a `numpy` whose `load` never
  unpickles (`_NoPickleNumpy`); real caches are plain integer arrays and load unchanged.
* The .idx/.bin pair and the split are checked first by `launch.data.indexed` (a short .bin would
  otherwise train silently on whatever Megatron maps).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from launch.data.indexed import DataError, check_split, read_index
from launch.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "DEFAULT_EMBEDDED_DOCS",
    "DEFAULT_EMBEDDED_SEED",
    "Datasets",
    "BatchIterator",
    "build_datasets",
    "ensure_embedded_dataset",
    "file_lock",
]

DEFAULT_EMBEDDED_DOCS = 20000  # about 4.5 MB of text: many CPU epochs' worth for a tiny model
DEFAULT_EMBEDDED_SEED = 1234


class Datasets(NamedTuple):
    """The train and valid splits (`valid` is None when no validation samples were asked for)."""

    train: object
    valid: Optional[object]


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive advisory lock on `path` (created if needed); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent builders expected there
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _NoPickleNumpy:
    """numpy as Megatron's dataset modules see it, except that `load` never unpickles and returns
    only integer arrays: anything else in the index cache is refused, naming the file."""

    def __init__(self, numpy_module) -> None:
        self._numpy = numpy_module

    def __getattr__(self, name: str):
        return getattr(self._numpy, name)

    def load(self, file, *args, **kwargs):
        kwargs["allow_pickle"] = False
        try:
            array = self._numpy.load(file, *args, **kwargs)
        except ValueError as err:  # numpy refuses pickled/object data; a short file cannot be mapped
            array, why = None, "it holds pickled data" if "pickle" in str(err) else str(err)
        else:
            why = "it is not an integer array"
        if not isinstance(array, self._numpy.ndarray) or array.dtype.kind not in "iu":
            raise DataError(f"{file}: not a plain numpy index array ({why}); refused unread, since "
                            "unpickling can run code: delete it (the index cache is rebuilt) and check "
                            "who can write to data.cache_dir")
        return array


def _import_megatron_gpt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import blended_dataset, gpt_dataset
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    # Installed once and for good (not around each build): concurrent builds can never restore
    # the unsafe loader under each other.
    for module in (gpt_dataset, blended_dataset):
        if not isinstance(module.numpy, _NoPickleNumpy):
            module.numpy = _NoPickleNumpy(module.numpy)
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def build_datasets(
    prefix: str,
    seq_len: int,
    num_samples: dict,
    seed: int,
    tokenizer: Union[str, object] = "byte",
    *,
    split: str = "98,2,0",
    cache_dir: Optional[str] = None,
    eod_mask_loss: bool = False,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> Datasets:
    """Megatron GPTDatasets for the train and valid splits of the indexed dataset at `prefix`.
    (About 75 lines, most of it the documented argument list and the Megatron config it fills.)

    num_samples: {"train": N, "valid": M}, the samples each split must provide (Megatron repeats
        and reshuffles epochs to reach them; the dataset may be slightly longer).
    split: Megatron's document split weights "train,valid,test" (the test split is never built).
    tokenizer: a tokenizer object or a `load_tokenizer` spec; only vocab_size, eod and
        unique_identifiers are used (eod for the optional EOD loss masking).
    cache_dir: where Megatron caches its index arrays; default `<dir of prefix>/index-cache`.

    Each sample is a dict of torch tensors: tokens and labels (LongTensor[seq_len], labels are the
    tokens shifted left by one), loss_mask (float; with eod_mask_loss Megatron zeroes it where the
    *input* token is EOD, i.e. the guess of the next document's first token) and position_ids.
    Raises FileNotFoundError, or DataError (a ValueError) naming the file or setting.
    """
    unknown = set(num_samples) - {"train", "valid"}
    if unknown or "train" not in num_samples:
        raise ValueError(
            f"num_samples must be a dict with keys 'train' and optionally 'valid', got {num_samples!r}"
        )
    n_train, n_valid = int(num_samples["train"]), int(num_samples.get("valid", 0))
    if n_train <= 0 or n_valid < 0:
        raise ValueError(f"need num_samples train > 0 and valid >= 0, got {num_samples!r}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    prefix = os.path.abspath(prefix)
    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(
                f"indexed dataset {prefix}{ext} not found; write one with "
                "`python -m launch.prepare_data --input FILE --output-prefix PREFIX`"
            )
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    cache_dir = os.path.abspath(cache_dir or os.path.join(os.path.dirname(prefix), "index-cache"))
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the dataset index cache {cache_dir} ({err}); pass cache_dir=") from err
    if not os.access(cache_dir, os.W_OK):
        raise DataError(f"the dataset index cache {cache_dir} is not writable; pass cache_dir=")
    info = read_index(prefix)
    try:
        check_split(info.lengths, split, need_valid=n_valid > 0, where=prefix)
    except DataError as err:
        raise DataError(f"split {err}") from None

    Builder, GPTDataset, GPTDatasetConfig = _import_megatron_gpt()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=([prefix], None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        # The model builds its own causal mask; a [1, S, S] bool mask per sample is wasted memory.
        create_attention_mask=False,
    )
    if n_valid == 0:
        # Megatron builds every split with a non-None bookend, and a valid split of zero requested
        # samples but also zero tokens loops forever; dropping the bookend skips it. (split_matrix
        # is hashed into the train cache name, so this only costs one cache miss.)
        config.split_matrix = [config.split_matrix[0], None, None]
    builder = Builder(GPTDataset, [n_train, n_valid, None], is_built_on_rank or (lambda: True), config)
    lock = contextlib.nullcontext() if _distributed() else file_lock(os.path.join(cache_dir, ".lock"))
    with lock:
        train, valid, _ = builder.build()
    return Datasets(train, valid if n_valid > 0 else None)


def ensure_embedded_dataset(
    directory: str,
    num_docs: int = DEFAULT_EMBEDDED_DOCS,
    seed: int = DEFAULT_EMBEDDED_SEED,
    tokenizer: Union[str, object, None] = None,
) -> str:
    """Build the embedded synthetic corpus as an indexed dataset in `directory` once; return its prefix.

    The name encodes corpus version, tokenizer, size and seed, so different requests never share
    files. Safe when several processes call it at once: one builds (under a file lock, into temporary
    names renamed into place) and the others reuse the result.
    """
    from launch.data.corpus import CORPUS_VERSION, iter_embedded_corpus
    from launch.data.prepare import write_indexed_dataset

    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    tokenizer = tokenizer or ByteTokenizer()
    fingerprint = getattr(tokenizer, "fingerprint", type(tokenizer).__name__)
    prefix = os.path.join(
        os.path.abspath(directory), f"embedded-v{CORPUS_VERSION}-{fingerprint}-n{num_docs}-s{seed}"
    )

    def present() -> bool:
        return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")

    if present():
        return prefix
    with file_lock(os.path.join(os.path.abspath(directory), ".embedded.lock")):
        if not present():
            write_indexed_dataset(
                iter_embedded_corpus(num_docs, seed), prefix, tokenizer, append_eod=True
            )
    return prefix


class BatchIterator:
    """Deterministic, resumable micro-batches of a map-style dataset.

    Samples are taken in dataset order (GPTDataset has already shuffled them). Step t covers the
    global samples [p, p + B * world) with p = start_sample + t * B * world; data-parallel rank r
    gets [p + r * B, p + (r + 1) * B). Hence the ranks' batches, concatenated, equal the batch of a
    single process with micro_batch_size B * world: the single-process reference of an equivalence
    test sees exactly the same data.

    `next_sample` is the global index of the next step's first sample: store it in a checkpoint and
    pass it back as start_sample to resume exactly. With loop=True indices wrap around the dataset
    end (size the dataset with num_samples to avoid reuse); with loop=False iteration stops before
    the first incomplete global batch.
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        start_sample: int = 0,
        rank: int = 0,
        world: int = 1,
        loop: bool = True,
        keys: Sequence[str] = ("tokens", "labels", "loss_mask"),
    ) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if world <= 0 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world = world
        self.loop = loop
        self.keys = tuple(keys)
        self.next_sample = start_sample

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict:
        n = len(self.dataset)
        start = self.next_sample
        if not self.loop and start + self.global_batch_size > n:
            raise StopIteration
        first = start + self.rank * self.micro_batch_size
        samples = [self.dataset[(first + k) % n] for k in range(self.micro_batch_size)]
        batch = {key: torch.stack([s[key] for s in samples]) for key in self.keys}
        self.next_sample = start + self.global_batch_size
        return batch

    def state_dict(self) -> dict:
        return {"next_sample": self.next_sample}

    def load_state_dict(self, state: dict) -> None:
        self.next_sample = int(state["next_sample"])
