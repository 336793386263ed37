#!/usr/bin/env python
"""See megatron_simpo/convert/cli.py (megatron_to_hf)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_simpo.convert.cli import megatron_to_hf_main  # noqa: E402

if __name__ == "__main__":  # the guard matters: ranks are spawned processes
    megatron_to_hf_main()
