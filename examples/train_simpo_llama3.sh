#!/usr/bin/env bash
# SimPO with Megatron-Core, launched by torchrun's agent (python -m megatron_simpo.cli.launch).
#
# Default: one of the SimPO authors' recipes (README, "Recipes"; RECIPE, default
# llama3-8b-instruct-simpo: beta 2.5, gamma/beta 0.55, lr 1e-6, global batch 128, max length
# 2048 / prompt 1800, cosine with 10% warmup, one epoch, bf16, the recipe's Hub dataset unless
# DATA is given) on one node of 8 GPUs, from a checkpoint converted by
# megatron-simpo-convert-hf-to-megatron:
#
#   CHECKPOINT=/ckpt/llama3-8b-instruct-tp2 DATA=/data/train.jsonl VALID_DATA=/data/test.jsonl \
#   SAVE=/ckpt/llama3-8b-simpo bash examples/train_simpo_llama3.sh
#   RECIPE=gemma2-9b-it-simpo TP=4 CHECKPOINT=/ckpt/gemma-2-9b-it-tp4 bash examples/train_simpo_llama3.sh
#
# MODEL=tiny runs the embedded tiny default on CPU with two gloo processes (DP=2; TP=2 also
# works) and needs nothing else:  MODEL=tiny bash examples/train_simpo_llama3.sh
#
# The same command resumes: --load "$SAVE" goes with --save "$SAVE" (Megatron-LM's convention),
# so a first start begins from CHECKPOINT and later ones (a requeued job) from SAVE's latest
# checkpoint; --overwrite starts afresh in SAVE instead.
#
# Variables: RECIPE, CHECKPOINT, DATA, VALID_DATA, DATA_CACHE_DIR, SAVE, TP, PP, CP (context
# parallelism: long pairs, docs/context-parallel.md), MICRO_BATCH_SIZE,
# GLOBAL_BATCH_SIZE, TRAIN_ITERS (MODEL=tiny: default 500), NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, PYTHON; for the
# GPU recipe also TRANSFORMER_IMPL (transformer_engine, or local), SEQUENCE_PARALLEL (1 by
# default when TP > 1) and FP8 (e.g. FP8=hybrid; FP8_RECIPE defaults to tensorwise). Extra
# arguments are passed on to megatron_simpo.cli.train (megatron-simpo-train) and override the
# defaults and the recipe's flags of the same meaning (e.g. --lr 5e-7); an --algorithm other
# than simpo replaces the default recipe (not a RECIPE you set).
# The package must be installed (pip install ., or make setup).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-llama3-8b-instruct}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-}  # default: a free port on one node, 29500 on several

case "$MODEL" in
  tiny)
    OUT=${SAVE:-outputs/demo}
    SAVE=$OUT
    ASSETS="$OUT/assets"
    GPUS_PER_NODE=${GPUS_PER_NODE:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two processes share the CPU cores
    # Megatron-Core warns at import that TE and Apex are absent: expected on CPU.
    export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}
    if [ ! -f "$ASSETS/train.jsonl" ]; then
      "$PYTHON" "$REPO/tools/prepare_tiny_default.py" --output "$ASSETS"
    fi
    ARGS=(
      --model-config "$ASSETS/config.json"
      --tokenizer "$ASSETS/tokenizer"
      --train-data-path "$ASSETS/train.jsonl"
      --valid-data-path "$ASSETS/valid.jsonl"
      --data-cache-dir "$ASSETS/data-cache"
      --tensor-model-parallel-size "${TP:-1}"
      --pipeline-model-parallel-size "${PP:-1}"
      --context-parallel-size "${CP:-1}"
      --seq-length 64 --max-prompt-length 48
      --micro-batch-size "${MICRO_BATCH_SIZE:-16}" --global-batch-size "${GLOBAL_BATCH_SIZE:-32}"
      --train-iters "${TRAIN_ITERS:-500}"
      --lr 1e-3 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.05
      --use-distributed-optimizer
      --eval-interval 100 --log-interval 50 --eval-dump
      --save "$OUT" --seed 42
    )
    ;;
  llama3-8b-instruct|recipe)
    : "${CHECKPOINT:?set CHECKPOINT to a Megatron checkpoint from megatron-simpo-convert-hf-to-megatron}"
    if [ -z "${RECIPE:-}" ]; then  # the default recipe gives way to an --algorithm of yours
      RECIPE=llama3-8b-instruct-simpo
      RECIPE_BY_DEFAULT=1
    fi
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    SAVE=${SAVE:-outputs/$RECIPE}
    TP=${TP:-2}
    ARGS=(
      --recipe "$RECIPE"
      --pretrained-checkpoint "$CHECKPOINT"
      --transformer-impl "${TRANSFORMER_IMPL:-transformer_engine}"
      --tensor-model-parallel-size "$TP"
      --pipeline-model-parallel-size "${PP:-1}"
      --context-parallel-size "${CP:-1}"
      --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
      --eval-interval 100 --log-interval 1
      --save "$SAVE" --save-interval 200
    )
    if [ -n "${MICRO_BATCH_SIZE:-}" ]; then ARGS+=(--micro-batch-size "$MICRO_BATCH_SIZE"); fi
    if [ -n "${GLOBAL_BATCH_SIZE:-}" ]; then ARGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE"); fi
    if [ -n "${DATA:-}" ]; then  # your pairs instead of the recipe's Hub dataset
      ARGS+=(--train-data-path "$DATA")
      if [ -n "${VALID_DATA:-}" ]; then
        ARGS+=(--valid-data-path "$VALID_DATA")
      else
        ARGS+=(--valid-fraction 0.01)
      fi
    fi
    if [ "${SEQUENCE_PARALLEL:-$([ "$TP" -gt 1 ] && echo 1 || echo 0)}" = 1 ]; then
      ARGS+=(--sequence-parallel)
    fi
    if [ -n "${FP8:-}" ]; then
      ARGS+=(--fp8-format "$FP8" --fp8-recipe "${FP8_RECIPE:-tensorwise}")
    fi
    if [ -n "${DATA_CACHE_DIR:-}" ]; then  # tokenized pairs (default ~/.cache/megatron_simpo/data)
      ARGS+=(--data-cache-dir "$DATA_CACHE_DIR")
    fi
    ;;
  *)
    echo "unknown MODEL=$MODEL (use recipe, llama3-8b-instruct (the same) or tiny)" >&2
    exit 2
    ;;
esac

# Extra arguments replace the defaults above of the same meaning: the same flag, or another
# spelling of the same setting (examples/defaults.sh). (beta 2.5 and gamma = 0.55 x beta are the
# library's defaults.)
source "$REPO/examples/defaults.sh"
ALGORITHM_GIVEN=$(given_value --algorithm "$@")
if [ -n "${RECIPE_BY_DEFAULT:-}" ] && [ -n "$ALGORITHM_GIVEN" ] && [ "$ALGORITHM_GIVEN" != simpo ]; then
  SAME_MEANING+=("--recipe --algorithm")  # another algorithm than the recipe's SimPO
fi
keep_defaults_not_given "$@"
resume_from_save "$SAVE" "$@"

# megatron_simpo.cli.launch checks the command line, the data, the checkpoints and --save once,
# then runs torchrun's agent on megatron_simpo.cli.train: a user's mistake, found before or after
# the ranks start, is one line and exit code 2, never torchrun's failure report. Without
# MASTER_PORT a single node rendezvouses on a free port (two jobs on one machine never collide).
RENDEZVOUS=(--master-addr "$MASTER_ADDR")
if [ -n "$MASTER_PORT" ]; then RENDEZVOUS+=(--master-port "$MASTER_PORT"); fi

exec "$PYTHON" -m megatron_simpo.cli.launch \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" "${RENDEZVOUS[@]}" \
  -- "${ARGS[@]}" "$@"
