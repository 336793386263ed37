"""Answer files for AlpacaEval 2, Arena-Hard and MT-Bench (``megatron-simpo-generate-answers``).

  python tools/generate_answers.py --benchmark alpaca_eval --questions alpaca_eval.json \
      --output answers/alpaca_eval.json --load outputs/llama3-8b-instruct-simpo
See docs/evaluation.md and ``--help``.
"""

from megatron_simpo.cli.generate_answers import main

if __name__ == "__main__":
    main()
