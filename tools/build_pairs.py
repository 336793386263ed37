"""On-policy preference pairs (``megatron-simpo-build-pairs``): the SimPO v0.2 recipe's data.

  python tools/build_pairs.py --prompts-path prompts.jsonl --hf outputs/sft-hf \
      --reward-model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code --output pairs.parquet
See docs/on-policy.md and ``--help``.
"""

from megatron_simpo.cli.build_pairs import main

if __name__ == "__main__":
    main()
