#!/usr/bin/env python
"""Megatron checkpoint -> Hugging Face folder (= megatron-simpo-convert-megatron-to-hf)."""

from megatron_simpo.cli.convert import megatron_to_hf_main

if __name__ == "__main__":  # the guard matters: the converter spawns its ranks
    megatron_to_hf_main()
