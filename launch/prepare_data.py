"""`python -m launch.prepare_data` / `ultramoe prepare-data`: tokenize a text corpus into a Megatron
indexed dataset (PREFIX.bin + PREFIX.idx). The work is `launch/data/prepare.py` (its docstring says
which inputs are read and how); this module is the command line.

    python -m launch.prepare_data --input corpus.jsonl [--json-key text] \\
        --output-prefix data/corpus --tokenizer byte|path/to/tokenizer.json [--append-eod]
    python -m launch.prepare_data --embedded 10000 --output-prefix data/embedded --append-eod
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from launch.data.prepare import DatasetStats, PrepareDataError, iter_documents, write_indexed_dataset
from launch.data.tokenizer import TokenizerError, load_tokenizer

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.prepare_data",
        description="Tokenize a corpus into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE", help="a .txt or .jsonl file")
    src.add_argument(
        "--embedded", type=int, metavar="N",
        help="instead of a file, write N documents of the built-in synthetic corpus",
    )
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="write PREFIX.bin and PREFIX.idx (directories are created)")
    p.add_argument("--tokenizer", default="byte", metavar="SPEC",
                   help="'byte' (default) or the path of a Hugging Face tokenizer.json")
    p.add_argument("--eod-token", default=None, metavar="TOKEN",
                   help="end-of-document token of a tokenizer.json, if not a usual one")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document id to every document (recommended)")
    p.add_argument("--json-key", default="text", metavar="KEY",
                   help="field holding the text in each JSON line (default: text)")
    p.add_argument("--format", default="auto", choices=("auto", "txt", "jsonl"),
                   help="input format; auto uses the file name's extension")
    p.add_argument("--txt-split", default="paragraph", choices=("paragraph", "line", "file"),
                   help="what a document is in a .txt file (default: blank-line separated paragraph)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the embedded corpus")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _run(args) -> DatasetStats:
    from tqdm import tqdm

    tokenizer = load_tokenizer(args.tokenizer, eod_token=args.eod_token)
    # tqdm's disable=None hides the bar when stderr is not a terminal (logs, CI).
    disable = True if args.quiet else None
    if args.embedded is not None:
        from launch.data.corpus import iter_embedded_corpus

        if args.embedded <= 0:
            raise PrepareDataError(f"--embedded needs a positive number of documents, got {args.embedded}")
        if not 0 <= args.seed < 2**32:
            raise PrepareDataError(f"--seed must be in [0, 2**32), got {args.seed}")
        with tqdm(total=args.embedded, unit="doc", disable=disable, desc="embedded") as bar:
            return write_indexed_dataset(
                iter_embedded_corpus(args.embedded, args.seed), args.output_prefix, tokenizer,
                append_eod=args.append_eod, on_document=lambda: bar.update(1),
            )
    size = os.path.getsize(args.input) if os.path.isfile(args.input) else None
    with tqdm(total=size, unit="B", unit_scale=True, disable=disable,
              desc=os.path.basename(args.input)) as bar:
        docs = iter_documents(args.input, args.format, args.json_key, args.txt_split, bar.update)
        return write_indexed_dataset(docs, args.output_prefix, tokenizer, append_eod=args.append_eod)


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input or options)."""
    args = _parser().parse_args(argv)
    try:
        stats = _run(args)
    except (PrepareDataError, TokenizerError) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        skipped = f", skipped {stats.skipped_empty} empty" if stats.skipped_empty else ""
        print(
            f"wrote {stats.prefix}.bin/.idx: {stats.num_documents} documents, "
            f"{stats.num_tokens} tokens ({stats.dtype}){skipped}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
