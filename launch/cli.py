"""`ultramoe` command: one entry point with subcommands that forward to each tool's own CLI.

    ultramoe train --recipe configs/recipes/tiny_cpu.yaml [section.field=value ...]
    ultramoe prepare-data --input corpus.jsonl --output-prefix data/corpus --tokenizer byte
    ultramoe simulate estimate|search|calibrate|validate ...
    ultramoe export-hf --checkpoint runs/tiny_cpu/checkpoints --out hf/tiny
    ultramoe import-hf --hf hf/tiny --out runs/imported/checkpoints
"""
from __future__ import annotations

import sys
from typing import Optional

COMMANDS = {
    "train": ("launch.train", "train a model from a recipe YAML (also under torchrun)"),
    "prepare-data": ("launch.prepare_data", "turn text or JSONL into a Megatron .bin/.idx dataset"),
    "simulate": ("simulator.cli", "predict step time, MFU and memory; search layouts and model shapes"),
    "export-hf": ("launch.hf.export", "export a checkpoint's model to Hugging Face layout (DeepSeek-V3 names)"),
    "import-hf": ("launch.hf.import_", "turn a Hugging Face model directory into a weights-only checkpoint"),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ultramoe COMMAND [args...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<14}{help_text}")
        print("\n`ultramoe COMMAND --help` shows each command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = __import__(COMMANDS[name][0], fromlist=["main"])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
