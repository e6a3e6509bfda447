"""Tokenize a text corpus into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    python -m launch.prepare_data --input corpus.jsonl [--json-key text] \\
        --output-prefix data/corpus --tokenizer byte|path/to/tokenizer.json [--append-eod]
    python -m launch.prepare_data --embedded 10000 --output-prefix data/embedded --append-eod

The files are written with `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`, one
sequence per document, token dtype `DType.optimal_dtype(vocab_size)` (uint16 below 65500 ids, else
int32), exactly as Megatron-LM's `tools/preprocess_data.py` does, so Megatron-LM and MindSpeed-LLM
read them unchanged and corpora they prepared load here.

Inputs:
* `.jsonl` / `.json`: one JSON object per line, the text under `--json-key` (blank lines skipped);
* `.txt`: `--txt-split paragraph` (default: documents separated by blank lines), `line` (one
  document per line) or `file` (the whole file is one document, byte for byte);
* `--embedded N`: N documents of the built-in synthetic corpus (`launch.data.corpus`).

Documents that tokenize to nothing are skipped (an empty sequence would only confuse sample
building). Bad input stops the run with one message naming the file and line, exit status 2, and
nothing at the output prefix: the files are written under temporary names and renamed at the end.
"""
from __future__ import annotations

import json
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np


__all__ = [
    "PrepareDataError",
    "DatasetStats",
    "iter_documents",
    "write_indexed_dataset",
]

class PrepareDataError(ValueError):
    """The input or the options cannot be turned into a dataset. The message says where and why."""


@dataclass
class DatasetStats:
    """What `write_indexed_dataset` wrote."""

    prefix: str
    num_documents: int
    num_tokens: int
    skipped_empty: int
    dtype: str


def import_megatron_indexed_dataset():
    """Import megatron.core's indexed_dataset module without its Apex/TE fallback warnings.

    megatron.core's package __init__ imports most of Megatron (about 5 s on a laptop), so this is done
    lazily: tokenizing errors are reported before paying for it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# ---- reading ----------------------------------------------------------------------------------

def _detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        return "jsonl"
    if lower.endswith(".txt"):
        return "txt"
    raise PrepareDataError(
        f"{path}: cannot tell the format from the file name; use a .txt or .jsonl name "
        "or pass --format txt|jsonl"
    )


def _decode_line(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PrepareDataError(
            f"{path}:{lineno}: not valid UTF-8 text (byte {err.start + 1} of the line)"
        ) from None


def _iter_jsonl(f, path: str, key: str, on_bytes) -> Iterator[str]:
    for lineno, raw in enumerate(f, start=1):
        on_bytes(len(raw))
        line = _decode_line(raw, path, lineno)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepareDataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise PrepareDataError(
                f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
            )
        if key not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise PrepareDataError(
                f"{path}:{lineno}: no key {key!r} in the JSON object (its keys: {keys}); "
                "choose the text field with --json-key"
            )
        text = obj[key]
        if not isinstance(text, str):
            raise PrepareDataError(
                f"{path}:{lineno}: the value of {key!r} is {type(text).__name__}, expected a string"
            )
        yield text


def _iter_txt(f, path: str, split: str, on_bytes) -> Iterator[str]:
    if split == "file":
        raw = f.read()
        on_bytes(len(raw))
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            lineno = raw.count(b"\n", 0, err.start) + 1
            raise PrepareDataError(f"{path}:{lineno}: not valid UTF-8 text") from None
        return
    paragraph: list[str] = []
    for lineno, raw in enumerate(f, start=1):
        on_bytes(len(raw))
        line = _decode_line(raw, path, lineno).rstrip("\r\n")
        if split == "line":
            yield line
        elif line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def iter_documents(
    path: str,
    fmt: str = "auto",
    json_key: str = "text",
    txt_split: str = "paragraph",
    on_bytes: Optional[Callable[[int], None]] = None,
) -> Iterator[str]:
    """Yield the documents of a .txt or .jsonl file (see the module docstring for the rules).

    Raises PrepareDataError naming the file and line on the first bad line. `on_bytes(n)` is called
    with the size of each chunk read, for progress bars.
    """
    if fmt not in ("auto", "txt", "jsonl"):
        raise PrepareDataError(f"unknown format {fmt!r}: use auto, txt or jsonl")
    if txt_split not in ("paragraph", "line", "file"):
        raise PrepareDataError(f"unknown txt split {txt_split!r}: use paragraph, line or file")
    if not os.path.exists(path):
        raise PrepareDataError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise PrepareDataError(f"input is a directory, not a file: {path}")
    fmt = _detect_format(path, fmt)
    on_bytes = on_bytes or (lambda n: None)

    # A nested generator so that the checks above run at the call, not at the first next().
    def generate() -> Iterator[str]:
        with open(path, "rb") as f:
            if fmt == "jsonl":
                yield from _iter_jsonl(f, path, json_key, on_bytes)
            else:
                yield from _iter_txt(f, path, txt_split, on_bytes)

    return generate()


# ---- writing ----------------------------------------------------------------------------------

def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(tokenizer, texts: list[str]) -> list[np.ndarray]:
    if hasattr(tokenizer, "encode_array"):
        return [tokenizer.encode_array(t) for t in texts]
    if hasattr(tokenizer, "encode_batch"):
        return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    return [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]


def strip_prefix(prefix: str) -> str:
    """PREFIX.bin / PREFIX.idx / PREFIX all name the dataset PREFIX."""
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def write_indexed_dataset(
    documents: Iterable[str],
    output_prefix: str,
    tokenizer,
    append_eod: bool = False,
    on_document: Optional[Callable[[], None]] = None,
) -> DatasetStats:
    """Tokenize `documents` and write OUTPUT_PREFIX.bin/.idx atomically; return what was written.
    (About 70 lines: the write, the index and the clean-up on failure share one try block.)

    Errors raised while iterating `documents` (e.g. PrepareDataError for a bad line) propagate
    after the temporary files are removed; existing files at the prefix are then left untouched.
    Raises PrepareDataError if no non-empty document was seen.
    """
    output_prefix = strip_prefix(output_prefix)
    indexed_dataset = import_megatron_indexed_dataset()
    dtype = indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    created_dirs = []
    probe = out_dir
    while not os.path.isdir(probe):
        created_dirs.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(out_dir, exist_ok=True)

    # Unique temporary names: two processes preparing the same prefix must not write one file.
    tmp = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = tmp + ".bin", tmp + ".idx"
    builder = None
    num_docs = num_tokens = skipped = 0
    eod = np.asarray([tokenizer.eod], dtype=np.int64)
    try:
        builder = indexed_dataset.IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        for batch in _batched(documents, 256):
            for ids in _encode_batch(tokenizer, batch):
                if on_document is not None:
                    on_document()
                if append_eod:
                    ids = np.concatenate([ids.astype(np.int64, copy=False), eod])
                if ids.size == 0:
                    skipped += 1
                    continue
                builder.add_document(ids, [int(ids.size)])
                num_docs += 1
                num_tokens += int(ids.size)
        if num_docs == 0:
            what = f" ({skipped} empty documents)" if skipped else ""
            raise PrepareDataError(f"no documents to write: the input is empty{what}")
        builder.finalize(tmp_idx)
        # The .idx is what marks a dataset as present: drop the old one first and put the new one
        # in place last, so a crash in between never pairs a new .bin with an old .idx.
        final_bin, final_idx = output_prefix + ".bin", output_prefix + ".idx"
        if os.path.exists(final_idx):
            os.unlink(final_idx)
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    except BaseException:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.unlink(path)
        for d in created_dirs:
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    return DatasetStats(output_prefix, num_docs, num_tokens, skipped, np.dtype(dtype).name)
