# Sourced by the launch scripts in examples/: their default flags (the array ARGS) give way to
# the user's extra arguments of the same meaning, the same flag or another spelling of the same
# setting, so a default never contradicts what the user asked for.
#   keep_defaults_not_given "$@"   # ARGS without the defaults the arguments replace
#   resume_from_save "$SAVE" "$@"  # ARGS plus --load of the save folder: the same command resumes

SAME_MEANING=(
  "--train-iters --train-epochs"
  "--simpo-gamma --simpo-gamma-beta-ratio"
  "--simpo-beta --beta"
  "--model-config --pretrained-checkpoint"
  "--valid-data-path --valid-fraction"
  "--data-cache-dir --data-cache-path"
  "--micro-batch-size --max-tokens-per-microbatch"
)

replaced_by_user() {  # is default flag $1 set by the user's arguments (the rest)?
  local flag=$1 given group
  shift
  for given in "$@"; do
    [[ $given == --* ]] || continue
    given=${given%%=*}
    [ "$given" = "$flag" ] && return 0
    for group in "${SAME_MEANING[@]}"; do
      [[ " $group " == *" $flag "* && " $group " == *" $given "* ]] && return 0
    done
  done
  return 1
}

keep_defaults_not_given() {  # ARGS minus each default flag (and its value) the arguments replace
  local kept=() i=0 flag width
  while [ $i -lt ${#ARGS[@]} ]; do
    flag=${ARGS[$i]}
    width=1
    if [ $((i + 1)) -lt ${#ARGS[@]} ] && [[ ${ARGS[$((i + 1))]} != --* ]]; then width=2; fi
    if ! replaced_by_user "$flag" "$@"; then kept+=("${ARGS[@]:$i:$width}"); fi
    i=$((i + width))
  done
  ARGS=("${kept[@]}")
}

given_value() {  # the value of flag $1 among the arguments (the rest; empty: not given)
  local flag=$1 previous="" argument
  shift
  for argument in "$@"; do
    if [ "$previous" = "$flag" ]; then echo "$argument"; return; fi
    case "$argument" in "$flag"=*) echo "${argument#"$flag"=}"; return ;; esac
    previous=$argument
  done
}

given_flag() {  # is flag $1 among the arguments (the rest)?
  local flag=$1 argument
  shift
  for argument in "$@"; do
    [ "${argument%%=*}" = "$flag" ] && return 0
  done
  return 1
}

resume_from_save() {  # ARGS plus --load <the save folder> (the user's --save, else $1)
  # Megatron-LM's --load with --save: a first start begins from --pretrained-checkpoint (the
  # save folder holds no checkpoint yet), later ones go on from its latest checkpoint. A
  # --load of the user's, or --overwrite (a fresh run in the save folder), go without it.
  local default=$1
  shift
  if ! given_flag --load "$@" && ! given_flag --overwrite "$@"; then
    local given
    given=$(given_value --save "$@")
    ARGS+=(--load "${given:-$default}")
  fi
}
