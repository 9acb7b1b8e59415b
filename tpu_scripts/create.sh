#!/usr/bin/env bash
# Create a TPU VM or pod slice through a queued resource and wait until it is ACTIVE.
#
#   tpu_scripts/create.sh --name jd-v4 --project P --zone us-central2-b --accelerator v4-32 [--spot]
#
# Script flags: --no-wait (return once the request is queued), --timeout SECONDS (default 3600),
# --poll SECONDS (default 30). Common flags: see tpu_scripts/lib.sh (or --help).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

jd_parse_common "$@"
wait_active=1 timeout=3600 poll=30
set -- "${JD_ARGS[@]+"${JD_ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --no-wait) wait_active=0; shift ;;
    --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
    --poll) poll="${2:?--poll needs seconds}"; shift 2 ;;
    -h | --help) sed -n '2,8p' "$0"; jd_usage_common; exit 0 ;;
    *) jd_die "create.sh: unknown argument $1" ;;
  esac
done
jd_require name project zone accelerator
jd_describe
runtime="${JD_RUNTIME:-$(jd_default_runtime "$JD_ACCELERATOR")}"

mapfile -t where < <(jd_where)
create=(gcloud compute tpus queued-resources create "$JD_NAME" "${where[@]}"
  "--node-id=$JD_NAME" "--accelerator-type=$JD_ACCELERATOR" "--runtime-version=$runtime")
[[ "$JD_SPOT" == 1 ]] && create+=(--spot)
jd_run "${create[@]}"

describe=(gcloud compute tpus queued-resources describe "$JD_NAME" "${where[@]}"
  "--format=value(state.state)")
if [[ "$wait_active" == 0 ]]; then
  exit 0
fi
if [[ "$JD_DRY_RUN" == 1 ]]; then
  echo "# then poll every ${poll}s until the state is ACTIVE (at most ${timeout}s):"
  jd_run "${describe[@]}"
  exit 0
fi
deadline=$((SECONDS + timeout))
while true; do
  state="$("${describe[@]}")"
  echo "$(date +%H:%M:%S) ${JD_NAME}: ${state}"
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED) jd_die "queued resource ${JD_NAME} is ${state}; see: ${describe[*]% *}" ;;
  esac
  ((SECONDS < deadline)) || jd_die "${JD_NAME} not ACTIVE after ${timeout}s (last state ${state})"
  sleep "$poll"
done
