#!/usr/bin/env python
"""See megatron_simpo/convert/cli.py (hf_to_megatron)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_simpo.convert.cli import hf_to_megatron_main  # noqa: E402

if __name__ == "__main__":  # the guard matters: ranks are spawned processes
    hf_to_megatron_main()
