"""`ultramoe import-hf`: a Hugging Face model directory -> a weights-only training checkpoint.
The conversion lives in launch/hf_export.py; this module is the command's entry point."""
from __future__ import annotations

import sys

from launch.hf_export import import_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
