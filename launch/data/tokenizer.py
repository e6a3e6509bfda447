"""Tokenizers for data preparation and training.

Two implementations share one small interface (`vocab_size`, `eod`, `encode`, `decode`) plus the
attributes `megatron.core.datasets.GPTDataset` reads from `GPTDatasetConfig.tokenizer`:

* `vocab_size` and `eod` (sample building, EOD loss masking, position-id resets),
* `unique_identifiers` (an ordered dict hashed into the name of the dataset index cache, so it must
  be deterministic and must change when the token ids would change),
* the legacy `tokenize`/`detokenize`/`vocab`/`inv_vocab` names, so the same object also fits code
  written against `MegatronLegacyTokenizer`.

The objects deliberately do not subclass a Megatron tokenizer class: that class moved and was renamed
between megatron-core releases (`datasets.megatron_tokenizer.MegatronTokenizer` up to 0.12,
`MegatronLegacyTokenizer` plus `tokenizers.MegatronTokenizerBase` in 0.16) and the legacy one logs a
deprecation warning on construction; GPTDataset only duck-types the attributes above.

Neither tokenizer defines `pad`: GPTDataset then uses its own sentinel (-1), which never occurs in
the data, so no real token is ever masked out as padding.

`ByteTokenizer` (spec "byte") needs no files: token ids are the UTF-8 bytes of the text. Byte 0xFF
can never occur in UTF-8, so it is reserved as the end-of-document id and the vocabulary stays at
exactly 256 ids, the size of the tiny CPU models. (0xC0, 0xC1 and 0xF5-0xFE never occur either; they
are simply never produced.)

`HFTokenizer` wraps a local Hugging Face `tokenizer.json` through the optional `tokenizers` package;
nothing is ever fetched from a hub.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "TokenizerError",
    "load_tokenizer",
]


class TokenizerError(ValueError):
    """A tokenizer spec or file cannot be used. The message says what to do instead."""


class _MegatronNames:
    """The legacy Megatron tokenizer names, derived from `encode`, `decode`, `eod` and `vocab`."""

    @property
    def eos(self) -> int:
        return self.eod

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {v: k for k, v in self.vocab.items()}


class ByteTokenizer(_MegatronNames):
    """UTF-8 bytes as tokens; id 255 (never a UTF-8 byte) is end-of-document. vocab_size = 256."""

    EOD = 0xFF

    def __init__(self) -> None:
        self.unique_identifiers = OrderedDict(
            [("class", "ByteTokenizer"), ("version", 1), ("vocab_size", 256), ("eod", self.EOD)]
        )

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def fingerprint(self) -> str:
        """Short stable tag naming the token mapping, for cache file names."""
        return "byte1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Like `encode` but straight to a uint8 array: the fast path used when writing datasets."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text. EOD ids are dropped; invalid UTF-8 (model samples) becomes U+FFFD."""
        data = bytes(int(i) for i in ids if int(i) != self.EOD)
        return data.decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict[str, int]:
        table = {bytes([i]).decode("latin-1"): i for i in range(255)}
        table["<eod>"] = self.EOD
        return table

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256, eod=255)"


# Tried in order when the caller does not name the end-of-document token.
_EOD_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "<|im_end|>",
    "[EOS]",
    "<|end|>",
)


def _import_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError as err:
        raise TokenizerError(
            "a tokenizer.json needs the Hugging Face 'tokenizers' package, which is not installed; "
            "run `pip install tokenizers` or use the built-in byte tokenizer (--tokenizer byte)"
        ) from err
    return tokenizers


class HFTokenizer(_MegatronNames):
    """A local Hugging Face `tokenizer.json` (needs `pip install tokenizers`).

    Texts are encoded without the tokenizer's own special tokens (no automatic BOS): document
    boundaries are marked by appending `eod` when the dataset is written, as Megatron does.
    """

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        tokenizers = _import_tokenizers()
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises its own exception type
            raise TokenizerError(f"cannot load tokenizer file {path}: {err}") from err
        self.path = os.path.abspath(path)
        self._vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        names = [eod_token] if eod_token is not None else list(_EOD_CANDIDATES)
        found = [(n, self._tok.token_to_id(n)) for n in names]
        found = [(n, i) for n, i in found if i is not None]
        if not found:
            if eod_token is not None:
                raise TokenizerError(f"{path}: the vocabulary has no token {eod_token!r}")
            raise TokenizerError(
                f"{path}: no end-of-document token found (looked for {', '.join(_EOD_CANDIDATES)}); "
                "name one with load_tokenizer(path, eod_token=...)"
            )
        self.eod_token, self._eod = found[0]
        with open(path, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()
        # The content hash rather than the path names the cache: a moved or copied tokenizer.json
        # keeps hitting the same dataset index cache, an edited one does not.
        self.unique_identifiers = OrderedDict(
            [("class", "HFTokenizer"), ("sha1", digest), ("eod", self._eod)]
        )
        self._fingerprint = "hf" + digest[:12]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (the Rust side parallelises this)."""
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self._vocab_size}, eod={self._eod})"


def load_tokenizer(spec: str, eod_token: Optional[str] = None):
    """Build a tokenizer from a spec: "byte", or the path of a Hugging Face tokenizer.json.

    `eod_token` (HF only) names the end-of-document token when none of the usual ones exists.
    Raises TokenizerError with a message saying what is wrong and what to do.
    """
    if not isinstance(spec, str) or not spec:
        raise TokenizerError(f"tokenizer spec must be 'byte' or a path to tokenizer.json, got {spec!r}")
    if spec == "byte":
        if eod_token is not None:
            raise TokenizerError("eod_token cannot be set for the byte tokenizer (its eod is 255)")
        return ByteTokenizer()
    if spec.endswith(".json") or os.path.sep in spec or os.path.exists(spec):
        if not os.path.exists(spec):
            raise TokenizerError(f"tokenizer file not found: {spec}")
        if os.path.isdir(spec):
            candidate = os.path.join(spec, "tokenizer.json")
            if not os.path.isfile(candidate):
                raise TokenizerError(f"{spec} is a directory without a tokenizer.json")
            spec = candidate
        return HFTokenizer(spec, eod_token=eod_token)
    raise TokenizerError(
        f"unknown tokenizer spec {spec!r}: use 'byte' or the path of a Hugging Face tokenizer.json"
    )
