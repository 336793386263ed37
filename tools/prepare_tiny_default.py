#!/usr/bin/env python
"""Write the embedded tiny default (tokenizer, model config, synthetic pairs) to a folder."""

import argparse

from megatron_simpo.tiny import write_default

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--train-pairs", type=int, default=40000)
    parser.add_argument("--valid-pairs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    paths = write_default(args.output, train_pairs=args.train_pairs, valid_pairs=args.valid_pairs,
                          seed=args.seed)
    print(" ".join(f"{name}={path}" for name, path in paths.items()))
