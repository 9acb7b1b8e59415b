#!/usr/bin/env bash
# Run the same `jaxdetox run` on every worker of a TPU VM / slice (multi-host start-up through
# JAXDETOX_DISTRIBUTED=1: JAX finds its peers on the slice), detached, logging on each worker.
#
#   tpu_scripts/run.sh --name jd-v4 --config experiments/llama2-7b/pr_sequential.yaml \
#       --out gs://BUCKET/runs/llama7b [--role sampler|nado|lm] [-- finetune.kl_weight=0.5 ...]
#
# --config FILE   copied to every worker (run directory, model and data paths in it must be
#                 reachable from the workers: gs://, hub ids, or files installed there)
# --out RUN_DIR   the run directory; gs://... so that every host (and every role) shares it
# --role ROLE     the parallel scheme's jobs placement: this slice runs one role
# --env K=V       extra environment on the workers (repeatable)
# --foreground    stay attached and stream every worker's output (default: detach; then
#                 tpu_scripts/logs.sh --follow)
# After `--`: KEY=VALUE config overrides. Common flags: see tpu_scripts/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

jd_parse_common "$@"
config="" out="" role="" foreground=0 envs=(JAXDETOX_DISTRIBUTED=1) overrides=()
set -- "${JD_ARGS[@]+"${JD_ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --config) config="${2:?--config needs a file}"; shift 2 ;;
    --out) out="${2:?--out needs a run directory}"; shift 2 ;;
    --role) role="${2:?--role needs sampler, nado or lm}"; shift 2 ;;
    --env) envs+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --foreground) foreground=1; shift ;;
    --) shift; overrides=("$@"); break ;;
    -h | --help) sed -n '2,16p' "$0"; jd_usage_common; exit 0 ;;
    *) jd_die "run.sh: unknown argument $1 (config overrides go after --)" ;;
  esac
done
jd_require name project zone
[[ -n "$config" ]] || jd_die "--config CONFIG.yaml is required"
[[ -f "$config" ]] || jd_die "--config $config: no such file"
[[ -n "$out" ]] || jd_die "--out RUN_DIR is required (gs://... to share it between hosts)"
case "$role" in
  "" | sampler | nado | lm) ;;
  *) jd_die "--role $role: expected sampler, nado or lm" ;;
esac
[[ -z "$JD_ACCELERATOR" ]] || jd_describe
[[ "$out" == *://* ]] || echo "# warning: --out $out is a local path on each worker, not shared" >&2

dir="$JD_REMOTE_DIR"
remote_config="$dir/configs/$(basename "$config")"
log="$dir/logs/${role:-run}"
jd_ssh all "mkdir -p $dir/configs $dir/logs"
jd_scp all "$config" "$JD_NAME:$remote_config"

cmd=(env "${envs[@]}" python3 -m jaxdetox.cli run "$remote_config" --out "$out" --no-progress)
[[ -n "$role" ]] && cmd+=(--role "$role")
cmd+=("${overrides[@]+"${overrides[@]}"}")
line="$(jd_quote "${cmd[@]}")"
if [[ "$foreground" == 1 ]]; then
  jd_ssh all "set -o pipefail; $line 2>&1 | tee $log.log"
else
  jd_ssh all "nohup $line > $log.log 2>&1 < /dev/null & echo \$! > $log.pid"
  echo "# started; follow with: tpu_scripts/logs.sh --name $JD_NAME${role:+ --role $role} --follow"
fi
