#!/usr/bin/env bash
# SimPO on a mixture-of-experts model, one node of 8 GPUs (docs/moe.md), launched as
# examples/train_simpo_llama3.sh is (python -m megatron_simpo.cli.launch checks everything once,
# then torchrun's agent starts the ranks).
#
#   MODEL=qwen3-30b-a3b CHECKPOINT=/ckpt/qwen3-30b-a3b DATA=/data/train.jsonl \
#   SAVE=/ckpt/qwen3-30b-a3b-simpo bash examples/train_simpo_moe.sh [extra training flags]
#
# The checkpoint must be converted for the same layout, e.g. for qwen3-30b-a3b:
#   megatron-simpo-convert-hf-to-megatron --hf-path /models/Qwen3-30B-A3B --save /ckpt/qwen3-30b-a3b \
#     --tensor-parallel-size 4 --pipeline-parallel-size 2 --expert-model-parallel-size 4 \
#     --expert-tensor-parallel-size 1 --dtype bf16
#
# Presets (layouts per 8 GPUs; memory per rank in docs/performance.md, "Mixture of experts"):
#   qwen3-30b-a3b  TP 4 (sequence parallel) x PP 2, experts EP 4 x ETP 1: Megatron-Bridge's
#                  Qwen3-30B-A3B DPO layout; router trainable, load-balancing loss 0 (NeMo-RL)
#   mixtral-8x7b   TP 2 (sequence parallel) x PP 4, experts EP 2 x ETP 1 (141 GB GPUs: H200)
# The same command resumes: --load goes with --save (Megatron-LM's convention); --overwrite
# starts afresh in SAVE instead.
# Variables: MODEL, CHECKPOINT, DATA, VALID_DATA, SAVE, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE,
# GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON. Extra arguments replace
# the defaults of the same meaning (examples/defaults.sh: --train-iters replaces --train-epochs),
# e.g. --freeze-moe-router, --lr 1e-6.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-qwen3-30b-a3b}
: "${CHECKPOINT:?set CHECKPOINT to a Megatron checkpoint converted for this layout}"
: "${DATA:?set DATA to a JSONL file with prompt, chosen, rejected}"

case "$MODEL" in
  qwen3-30b-a3b) LAYOUT=(--tensor-model-parallel-size 4 --pipeline-model-parallel-size 2
                         --expert-model-parallel-size 4 --expert-tensor-parallel-size 1) ;;
  mixtral-8x7b)  LAYOUT=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 4
                         --expert-model-parallel-size 2 --expert-tensor-parallel-size 1) ;;
  *) echo "unknown MODEL=$MODEL (use qwen3-30b-a3b or mixtral-8x7b)" >&2; exit 2 ;;
esac

ARGS=(
  --pretrained-checkpoint "$CHECKPOINT" --train-data-path "$DATA"
  "${LAYOUT[@]}" --sequence-parallel
  --moe-aux-loss-coeff 0 --moe-router-dtype fp32
  --seq-length 2048 --max-prompt-length 1800
  --micro-batch-size "${MICRO_BATCH_SIZE:-1}" --global-batch-size "${GLOBAL_BATCH_SIZE:-128}"
  --train-epochs 1 --lr 5e-7 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1
  --weight-decay 0 --clip-grad 1.0
  --bf16 --use-distributed-optimizer --recompute-granularity selective
  --eval-interval 100 --log-interval 1
  --save "${SAVE:=outputs/$MODEL-simpo}" --save-interval 200 --seed 42
)
if [ -n "${VALID_DATA:-}" ]; then ARGS+=(--valid-data-path "$VALID_DATA"); else ARGS+=(--valid-fraction 0.01); fi
source "$REPO/examples/defaults.sh"
keep_defaults_not_given "$@"
resume_from_save "$SAVE" "$@"  # the same command resumes
RENDEZVOUS=(--master-addr "${MASTER_ADDR:-127.0.0.1}")
if [ -n "${MASTER_PORT:-}" ]; then RENDEZVOUS+=(--master-port "$MASTER_PORT"); fi

exec "$PYTHON" -m megatron_simpo.cli.launch \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  "${RENDEZVOUS[@]}" -- "${ARGS[@]}" "$@"
