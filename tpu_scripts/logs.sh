#!/usr/bin/env bash
# Follow or collect the logs of tpu_scripts/run.sh on a TPU VM / slice.
#
#   tpu_scripts/logs.sh --name jd-v4 --follow [--worker 0]   # stream one worker's log
#   tpu_scripts/logs.sh --name jd-v4 --copy logs/jd-v4         # every worker's log, here
#   tpu_scripts/logs.sh --name jd-v4 --status                  # is the run alive on each worker
#
# --role ROLE selects the log of a jobs-mode role (default: the plain run's). --copy needs the
# worker count: from --accelerator, else asked from gcloud. Common flags: see tpu_scripts/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

jd_parse_common "$@"
action=follow worker=0 dest="" role=""
set -- "${JD_ARGS[@]+"${JD_ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --follow) action=follow; shift ;;
    --worker) worker="${2:?--worker needs an index}"; shift 2 ;;
    --copy) action=copy; dest="${2:?--copy needs a local directory}"; shift 2 ;;
    --status) action=status; shift ;;
    --role) role="${2:?--role needs sampler, nado or lm}"; shift 2 ;;
    -h | --help) sed -n '2,10p' "$0"; jd_usage_common; exit 0 ;;
    *) jd_die "logs.sh: unknown argument $1" ;;
  esac
done
jd_require name project zone
log="$JD_REMOTE_DIR/logs/${role:-run}"

case "$action" in
  follow) jd_ssh "$worker" "tail -n +1 -F $log.log" ;;
  status)
    jd_ssh all "if [ -f $log.pid ] && kill -0 \$(cat $log.pid) 2>/dev/null; then echo \$(hostname): running; else echo \$(hostname): not running; fi; tail -n 2 $log.log"
    ;;
  copy)
    jd_resolve_accelerator
    jd_describe
    [[ "$JD_DRY_RUN" == 1 ]] || mkdir -p "$dest"
    hosts="$(jd_hosts "$JD_ACCELERATOR")"
    for ((i = 0; i < hosts; i++)); do
      jd_scp "$i" "$JD_NAME:$log.log" "$dest/${role:-run}-worker-$i.log"
    done
    ;;
esac
