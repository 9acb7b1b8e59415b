#!/usr/bin/env bash
# The parallel scheme's `jobs` placement on TPUs: one slice per role (sampler, NADO trainer,
# LLM trainer), each its own multi-host JAX program, all sharing one gs:// run directory
# (they coordinate only through it: manifest, checkpoints, sample stores).
#
#   tpu_scripts/jobs.sh ACTION --name jd --project P --zone Z --accelerator v5p-8 \
#       [--sampler-accelerator v5litepod-8] [--nado-accelerator v5p-8] [--lm-accelerator v5p-32] \
#       [--config CONFIG.yaml --out gs://BUCKET/runs/x] [-- KEY=VALUE ...]
#
# ACTION: create | install | run | logs | stop | delete, done for every role in turn with the
# slice NAME-ROLE (e.g. jd-lm). Each role's accelerator defaults to --accelerator. `run` adds
# the override loop.placement=jobs. Arguments other than the role
# accelerators go to tpu_scripts/ACTION.sh unchanged (e.g. --repo for install, --copy DIR for
# logs: DIR/ROLE-worker-N.log). --role ROLE acts on that role's slice only
# (restart one role; `logs --follow` needs it). Common flags: see tpu_scripts/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

here="$(dirname "${BASH_SOURCE[0]}")"
action="${1:-}"
case "$action" in
  create | install | run | logs | stop | delete) shift ;;
  -h | --help | "") sed -n '2,16p' "$0"; jd_usage_common; exit 0 ;;
  *) jd_die "jobs.sh: unknown action $action (create, install, run, logs, stop, delete)" ;;
esac
jd_parse_common "$@"
roles=(sampler nado lm)
declare -A accel=()
rest=()
set -- "${JD_ARGS[@]+"${JD_ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --sampler-accelerator | --nado-accelerator | --lm-accelerator)
      role="${1#--}"
      accel[${role%-accelerator}]="${2:?$1 needs a TPU type}"
      shift 2
      ;;
    --role)
      case "${2:-}" in sampler | nado | lm) roles=("$2") ;; *) jd_die "--role ${2:-}: expected sampler, nado or lm" ;; esac
      shift 2
      ;;
    --out)
      [[ "${2:-}" == *://* ]] || jd_die "--out ${2:-}: the roles run on different slices; use a shared gs:// run directory"
      rest+=("$1" "$2")
      shift 2
      ;;
    *) rest+=("$1"); shift ;;
  esac
done
jd_require name project zone
if [[ "$action" == logs && " ${rest[*]-} " != *" --copy "* && ${#roles[@]} -gt 1 ]]; then
  jd_die "jobs.sh logs: pick the role to follow with --role sampler|nado|lm (or --copy DIR for all)"
fi
mapfile -t common < <(jd_common_flags)

for role in "${roles[@]}"; do
  type="${accel[$role]:-$JD_ACCELERATOR}"
  args=(--name "$JD_NAME-$role" "${common[@]+"${common[@]}"}")
  [[ -n "$type" ]] && args+=(--accelerator "$type")
  case "$action" in
    run | stop | logs) args+=(--role "$role") ;;
  esac
  echo "# role $role: slice $JD_NAME-$role${type:+ ($type)}"
  mine=("${rest[@]+"${rest[@]}"}")
  if [[ "$action" == run ]]; then
    # One program per role: the jobs placement (an override equal to the config's is a no-op).
    [[ " ${mine[*]-} " == *" -- "* ]] || mine+=(--)
    mine+=(loop.placement=jobs)
    # Script flags first, then the overrides after `--` (kept last).
    for ((i = 0; i < ${#mine[@]}; i++)); do
      if [[ "${mine[$i]}" == -- ]]; then
        mine=("${mine[@]:0:i}" "${args[@]}" "${mine[@]:i}")
        args=()
        break
      fi
    done
  fi
  bash "$here/$action.sh" "${args[@]+"${args[@]}"}" "${mine[@]+"${mine[@]}"}"
done
