#!/usr/bin/env python
"""Hugging Face checkpoint -> Megatron distributed checkpoint (= megatron-simpo-convert-hf-to-megatron)."""

from megatron_simpo.cli.convert import hf_to_megatron_main

if __name__ == "__main__":  # the guard matters: the converter spawns its ranks
    hf_to_megatron_main()
