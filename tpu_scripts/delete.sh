#!/usr/bin/env bash
# Delete a TPU VM / slice and its queued resource (stops billing; the gs:// run directory stays).
#
#   tpu_scripts/delete.sh --name jd-v4 [--async]
#
# Common flags: see tpu_scripts/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

jd_parse_common "$@"
extra=()
set -- "${JD_ARGS[@]+"${JD_ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --async) extra+=(--async); shift ;;
    -h | --help) sed -n '2,6p' "$0"; jd_usage_common; exit 0 ;;
    *) jd_die "delete.sh: unknown argument $1" ;;
  esac
done
jd_require name project zone
mapfile -t where < <(jd_where)
# --force deletes the TPU VM the queued resource holds as well.
jd_run gcloud compute tpus queued-resources delete "$JD_NAME" "${where[@]}" --force --quiet \
  "${extra[@]+"${extra[@]}"}"
