"""Checks of a Megatron indexed dataset (PREFIX.idx + PREFIX.bin) and of its document split, read
straight from the files with numpy, without megatron.core.

Megatron maps whatever it is given: a `.bin` a few bytes short trains on silently, a truncated or
foreign `.idx` fails deep inside with an assertion or an index error. `read_index` checks the
`.idx` layout (what `IndexedDatasetBuilder` writes: header, sequence lengths, byte pointers,
document indices) and that the `.bin` holds exactly the bytes the index describes, so each of
those is one error naming the file, the expected and the actual size. `split_documents` computes
the document ranges of a "train,valid,test" split with Megatron's own arithmetic, so a split that
leaves a part empty is reported before Megatron is asked to build it (it would loop forever).
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

from config import ConfigError

__all__ = ["DataError", "IndexInfo", "read_index", "check_token_ids", "parse_split",
           "split_documents", "check_split"]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}  # megatron.core.datasets.indexed_dataset.DType
_CHUNK = 1 << 24  # elements per pass over the index: bounded memory for corpora of any size
_REPREPARE = "prepare it again with `python -m launch.prepare_data`"
_SPLIT = re.compile(r"\s*\d+(\.\d*)?\s*(,\s*\d+(\.\d*)?\s*){0,2}")


class DataError(ConfigError):
    """A dataset file, index cache or split cannot be used. The message names it and the fix."""


@dataclass
class IndexInfo:
    prefix: str
    dtype: np.dtype
    lengths: np.ndarray  # int32 tokens per sequence (one sequence per document here)

    @property
    def num_documents(self) -> int:
        return len(self.lengths)


def read_index(prefix: str) -> IndexInfo:
    """The checked index of PREFIX.idx/.bin; DataError naming the file on any inconsistency."""
    idx, binary = prefix + ".idx", prefix + ".bin"
    for path in (idx, binary):
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; write it with `python -m launch.prepare_data`")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:9] != INDEX_MAGIC:
        raise DataError(f"{idx}: not a Megatron index file (no MMIDIDX header); {_REPREPARE}")
    _, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if version != 1 or code not in _DTYPES:
        raise DataError(f"{idx}: unknown index version {version} or token type code {code}; {_REPREPARE}")
    expected = _HEADER.size + 12 * n_seq + 8 * n_doc  # int32 lengths, int64 pointers and bounds
    if size not in (expected, expected + n_seq):  # + one mode byte per sequence: multimodal
        raise DataError(f"{idx}: {size} bytes, but its header describes {n_seq} sequences and {n_doc} "
                        f"document bounds ({expected} bytes): the file is truncated or damaged; {_REPREPARE}")
    dtype = np.dtype(_DTYPES[code])
    mm = np.memmap(idx, mode="r")
    lengths = np.frombuffer(mm, np.int32, n_seq, _HEADER.size)
    pointers = np.frombuffer(mm, np.int64, n_seq, _HEADER.size + 4 * n_seq)
    docs = np.frombuffer(mm, np.int64, n_doc, _HEADER.size + 12 * n_seq)
    total = _check_pointers(idx, lengths, pointers, dtype.itemsize)
    if n_seq == 0 or n_doc < 2 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
        raise DataError(f"{idx}: holds no documents or inconsistent document bounds; {_REPREPARE}")
    actual = os.path.getsize(binary)
    if actual != total * dtype.itemsize:
        raise DataError(f"{binary}: {actual} bytes, but {idx} describes {total * dtype.itemsize} "
                        f"({total} tokens of {dtype.name}): the .bin is truncated or belongs to another "
                        f"index; {_REPREPARE}")
    return IndexInfo(prefix, dtype, lengths)


def _check_pointers(idx: str, lengths: np.ndarray, pointers: np.ndarray, itemsize: int) -> int:
    """Total tokens; each sequence must start where the previous one ends, as Megatron writes them."""
    total = 0
    for start in range(0, len(lengths), _CHUNK):
        part = lengths[start:start + _CHUNK].astype(np.int64)
        ends = total * itemsize + np.cumsum(part) * itemsize
        if np.any(part < 0) or not np.array_equal(pointers[start:start + _CHUNK], ends - part * itemsize):
            raise DataError(f"{idx}: sequence lengths and byte offsets disagree (damaged index); {_REPREPARE}")
        total += int(part.sum())
    return total


def check_token_ids(info: IndexInfo, vocab_size: int, limit_bytes: int = 64 << 20) -> None:
    """Token ids in the first `limit_bytes` of the .bin must lie in [0, vocab_size): catches a
    dataset prepared with another tokenizer, or a .bin of random bytes, without reading a huge
    corpus whole at every start."""
    binary = info.prefix + ".bin"
    if info.dtype.kind not in "iu":
        raise DataError(f"{binary}: holds {info.dtype.name} values, not token ids; {_REPREPARE}")
    count = min(int(info.lengths.sum(dtype=np.int64)), limit_bytes // info.dtype.itemsize)
    tokens = np.memmap(binary, dtype=info.dtype, mode="r", shape=(count,)) if count else np.zeros(1, info.dtype)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(f"{binary}: token id {bad} is outside the tokenizer's {vocab_size} ids: the dataset "
                        "was prepared with another tokenizer (set data.tokenizer to that one) or is damaged")


def parse_split(split: str) -> list[float]:
    """'98,2,0' -> [0.98, 0.02, 0.0], normalised as Megatron does. Stricter than Megatron, whose
    parser reads '-1,2' as '1,2' and 'abc' as '0,0,0'."""
    if not isinstance(split, str) or not _SPLIT.fullmatch(split):
        raise DataError(f"{split!r}: expected up to three non-negative weights train,valid,test, e.g. 98,2,0")
    weights = [float(w) for w in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    if weights[0] <= 0:
        raise DataError(f"{split!r} gives the train part no weight; e.g. 98,2,0")
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()  # the same arithmetic as megatron.core.datasets.utils.normalize


def split_documents(split: str, num_documents: int) -> list[Optional[tuple[int, int]]]:
    """Documents [begin, end) of train, valid and test (None: no weight), rounded exactly as
    megatron's convert_split_vector_to_split_matrix and BlendedMegatronDatasetBuilder round them."""
    ends = [0.0]
    for w in parse_split(split):
        ends.append(ends[-1] + w)
    n = float(num_documents)
    return [None if e <= b else (int(round(b * n)), int(round(e * n))) for b, e in zip(ends[:-1], ends[1:])]


def check_split(lengths: np.ndarray, split: str, need_valid: bool, where: str) -> int:
    """Tokens in the train part of `split` over documents of `lengths` (the dataset `where`);
    DataError when train, or valid if `need_valid`, gets no tokens, suggesting a split that works."""
    parts = split_documents(split, len(lengths))
    for name, bounds in zip(("train", "valid"), parts):
        if name == "valid" and not need_valid:
            continue
        if bounds is None or int(lengths[bounds[0]:bounds[1]].sum(dtype=np.int64)) == 0:
            got = "no weight" if bounds is None else f"documents [{bounds[0]}, {bounds[1]})"
            raise DataError(f"{split!r}: the {name} split gets no tokens ({where} has {len(lengths)} "
                            f"documents; {name} gets {got}); {_suggest(lengths)}")
    beg, end = parts[0]
    return int(lengths[beg:end].sum(dtype=np.int64))


def _suggest(lengths: np.ndarray) -> str:
    for valid in range(1, 51):
        parts = split_documents(f"{100 - valid},{valid},0", len(lengths))
        if all(int(lengths[b:e].sum(dtype=np.int64)) > 0 for b, e in parts[:2]):
            return f"use e.g. data.split: {100 - valid},{valid},0, or more documents"
    return "train and valid need a document each: use more documents"
