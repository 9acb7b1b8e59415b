#!/usr/bin/env bash
# Stop a run started by tpu_scripts/run.sh on every worker (SIGTERM to the recorded process;
# checkpoints and sample chunks are written atomically, so rerunning run.sh resumes).
#
#   tpu_scripts/stop.sh --name jd-v4 [--role sampler|nado|lm]
#
# Common flags: see tpu_scripts/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

jd_parse_common "$@"
role=""
set -- "${JD_ARGS[@]+"${JD_ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --role) role="${2:?--role needs sampler, nado or lm}"; shift 2 ;;
    -h | --help) sed -n '2,7p' "$0"; jd_usage_common; exit 0 ;;
    *) jd_die "stop.sh: unknown argument $1" ;;
  esac
done
jd_require name project zone
pid="$JD_REMOTE_DIR/logs/${role:-run}.pid"
jd_ssh all "if [ -f $pid ]; then kill \$(cat $pid) 2>/dev/null || true; rm -f $pid; fi"
