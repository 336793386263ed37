#!/usr/bin/env bash
# Rounds of on-policy SimPO (the v0.2 recipe, repeated): round N samples the prompts with the
# model round N-1 made (round 1: START), scores the samples (REWARD_MODEL or REWARD_FN), makes
# best-vs-worst pairs (megatron-simpo-build-pairs) and trains one epoch on them through
# examples/train_simpo_llama3.sh, from that same model. Each round has its own folder:
#
#   ROOT/round-N/pairs.jsonl          the round's pairs (the authors' schema)
#   ROOT/round-N/rewards.json         their reward statistics (mean reward of every sample,
#                                     mean chosen, mean rejected; build-pairs --reward-stats)
#   ROOT/round-N/sampler-hf/          the model that sampled them, as exported for sampling
#   ROOT/round-N/checkpoint/          the model the round made (metrics.jsonl, eval_dump/)
#   ROOT/round-N/heldout-rewards.json with HELDOUT_PROMPTS: that model's samples of them
#   ROOT/round-0/                     the start model's held-out statistics (and, for
#                                     MODEL=tiny without START, its warm-up checkpoint)
#
# then megatron-simpo-analyze-run ROOT plots the reward per round (ROOT/analysis/).
#
#   START=/ckpt/llama3-8b-instruct PROMPTS=/data/ultrafeedback-prompts.jsonl \
#   REWARD_MODEL=RLHFlow/ArmoRM-Llama3-8B-v0.1 PAIRS_ARGS="--trust-remote-code" \
#   ROOT=/ckpt/iterative bash examples/iterative_simpo.sh --rounds 3 --simpo-beta 10 \
#       --simpo-gamma-beta-ratio 0.3
#
# MODEL=tiny (make demo-onpolicy) is the on-policy demo on CPU, with nothing else needed: the
# tiny default warmed up on its embedded pairs (WARMUP_ITERS of SimPO with --sft-weight 1, so
# that it can answer at all), then ROUNDS rounds on PROMPTS_PER_ROUND fresh prompts of the task
# each (training: --lr 3e-4 --sft-weight 1 unless given), rewarded by
# megatron_simpo.model.tiny:letters_correct, held out: the 256 valid prompts.
#
# Variables: ROUNDS (or --rounds K), ROOT, START (a Megatron checkpoint), PROMPTS, HELDOUT_PROMPTS,
# REWARD_MODEL or REWARD_FN, NUM_SAMPLES, TEMPERATURE, MAX_NEW_TOKENS, SAMPLING_BATCH_SIZE,
# PAIRS_ARGS (more build-pairs flags), NPROC (build-pairs processes, torchrun), MODEL and the
# launcher's variables (TP, PP, GPUS_PER_NODE, ...), PYTHON; for MODEL=tiny also WARMUP_ITERS
# (default 200) and PROMPTS_PER_ROUND (default 512). --overwrite starts ROOT's rounds
# afresh; other arguments go to every round's training (megatron-simpo-train flags).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-llama3-8b-instruct}
ROUNDS=${ROUNDS:-}
OVERWRITE=0
die() { echo "iterative_simpo.sh: error: $*" >&2; exit 2; }
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
    --rounds=*) ROUNDS=${1#--rounds=}; shift ;;
    --overwrite) OVERWRITE=1; shift ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds (or ROUNDS) must be a number >= 1, got '${ROUNDS}'"

case "$MODEL" in
  tiny)
    ROOT=${ROOT:-outputs/demo-onpolicy}
    ASSETS="$ROOT/assets"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}
    HELDOUT_PROMPTS=${HELDOUT_PROMPTS-$ASSETS/valid.jsonl}
    REWARD_FN=${REWARD_FN:-megatron_simpo.model.tiny:letters_correct}
    NUM_SAMPLES=${NUM_SAMPLES:-4}
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-12}
    SAMPLING_BATCH_SIZE=${SAMPLING_BATCH_SIZE:-128}
    PROMPTS_PER_ROUND=${PROMPTS_PER_ROUND:-512}
    # Each round: the warm-up's objective (SimPO plus the chosen answer's NLL) at a lower rate;
    # pure SimPO at the launcher's 1e-3 unlearns the task here (the reward falls round by round).
    given() { local flag=$1 arg; shift; for arg in "$@"; do [[ $arg == "$flag" || $arg == "$flag="* ]] && return 0; done; return 1; }
    given --lr "${TRAIN_ARGS[@]}" || TRAIN_ARGS+=(--lr 3e-4)
    given --sft-weight "${TRAIN_ARGS[@]}" || TRAIN_ARGS+=(--sft-weight 1)
    ;;
  *)
    [ -n "${ROOT:-}" ] || die "set ROOT to the folder of the rounds"
    [ -n "${START:-}" ] || die "set START to the Megatron checkpoint round 1 samples with and trains from"
    [ -n "${PROMPTS:-}" ] || die "set PROMPTS to the prompts (any source the trainer reads)"
    HELDOUT_PROMPTS=${HELDOUT_PROMPTS:-}
    ;;
esac
if [ -z "${REWARD_MODEL:-}" ] && [ -z "${REWARD_FN:-}" ]; then
  die "set REWARD_MODEL (a sequence-classification reward model) or REWARD_FN (module:function)"
fi

if compgen -G "$ROOT/round-*" >/dev/null; then
  [ "$OVERWRITE" = 1 ] || die "$ROOT holds rounds already: give --overwrite to start afresh, or another ROOT"
  rm -rf "$ROOT"/round-* "$ROOT/analysis"
fi
mkdir -p "$ROOT"

launch() {  # one training run through the launcher (its defaults for MODEL), extra flags after
  MODEL=$MODEL SAVE=$ROOT PYTHON=$PYTHON CHECKPOINT=${CHECKPOINT:-} DATA=${DATA:-} bash "$REPO/examples/train_simpo_llama3.sh" "$@"
}
build_pairs() {  # megatron-simpo-build-pairs with the rounds' sampling and reward settings
  local reward=(--reward-fn "${REWARD_FN:-}")
  [ -n "${REWARD_MODEL:-}" ] && reward=(--reward-model "$REWARD_MODEL")
  local options=("${reward[@]}")
  [ -n "${NUM_SAMPLES:-}" ] && options+=(--num-samples "$NUM_SAMPLES")
  [ -n "${TEMPERATURE:-}" ] && options+=(--temperature "$TEMPERATURE")
  [ -n "${MAX_NEW_TOKENS:-}" ] && options+=(--max-new-tokens "$MAX_NEW_TOKENS")
  [ -n "${SAMPLING_BATCH_SIZE:-}" ] && options+=(--batch-size "$SAMPLING_BATCH_SIZE")
  # shellcheck disable=SC2206  # PAIRS_ARGS: flags split on spaces
  options+=(${PAIRS_ARGS:-})
  if [ "${NPROC:-1}" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
      -m megatron_simpo.cli.build_pairs "${options[@]}" "$@"
  else
    "$PYTHON" -m megatron_simpo.cli.build_pairs "${options[@]}" "$@"
  fi
}
heldout() {  # heldout CHECKPOINT FOLDER: the model's samples of the held-out prompts, scored
  [ -n "$HELDOUT_PROMPTS" ] || return 0
  echo "> held-out prompts sampled with $1"
  build_pairs --load "$1" --prompts-path "$HELDOUT_PROMPTS" \
    --output "$2/heldout-pairs.jsonl" --reward-stats "$2/heldout-rewards.json"
}

if [ "$MODEL" = tiny ]; then
  if [ ! -f "$ASSETS/train.jsonl" ]; then
    "$PYTHON" "$REPO/tools/prepare_tiny_default.py" --output "$ASSETS"
  fi
  if [ -z "${START:-}" ]; then  # the warm-up: SimPO with the chosen answers' NLL (CPO-SimPO)
    START=$ROOT/round-0/checkpoint
    echo "> round 0: warm-up of the tiny default, ${WARMUP_ITERS:-200} iterations"
    launch --train-iters "${WARMUP_ITERS:-200}" --sft-weight 1 --eval-interval "${WARMUP_ITERS:-200}" \
      --save "$START"
  fi
fi
mkdir -p "$ROOT/round-0"
heldout "$START" "$ROOT/round-0"

previous=$START
for round in $(seq 1 "$ROUNDS"); do
  dir=$ROOT/round-$round
  mkdir -p "$dir"
  prompts=${PROMPTS:-}
  if [ "$MODEL" = tiny ] && [ -z "$prompts" ]; then  # fresh prompts each round, from the far end
    prompts=$dir/prompts.jsonl                        # of the training set
    total=$(wc -l < "$ASSETS/train.jsonl")
    first=$((total - round * PROMPTS_PER_ROUND + 1))
    [ "$first" -ge 1 ] || die "$ROUNDS rounds of PROMPTS_PER_ROUND=$PROMPTS_PER_ROUND exceed $ASSETS/train.jsonl"
    sed -n "${first},$((first + PROMPTS_PER_ROUND - 1))p" "$ASSETS/train.jsonl" > "$prompts"
  fi
  echo "> round $round: sampling $prompts with $previous"
  build_pairs --load "$previous" --hf-out "$dir/sampler-hf" --prompts-path "$prompts" \
    --output "$dir/pairs.jsonl" --reward-stats "$dir/rewards.json"
  echo "> round $round: one epoch on $dir/pairs.jsonl from $previous"
  CHECKPOINT=$previous DATA=$dir/pairs.jsonl launch --pretrained-checkpoint "$previous" \
    --train-data-path "$dir/pairs.jsonl" --train-epochs 1 --save "$dir/checkpoint" "${TRAIN_ARGS[@]}"
  heldout "$dir/checkpoint" "$dir"
  previous=$dir/checkpoint
done
"$PYTHON" -m megatron_simpo.cli.analyze_run "$ROOT"
