# shellcheck shell=bash
# Shared by every tpu_scripts/*.sh (sourced, never run): the common flags, their environment
# defaults, the worker count of an accelerator type, and `jd_run`, which prints each gcloud
# command and runs it unless --dry-run.
#
# Common flags (each defaults to its environment variable):
#   --name NAME                JAXDETOX_TPU_NAME         TPU VM / queued resource name
#   --project PROJECT          JAXDETOX_TPU_PROJECT      (else CLOUDSDK_CORE_PROJECT)
#   --zone ZONE                JAXDETOX_TPU_ZONE         (else CLOUDSDK_COMPUTE_ZONE)
#   --accelerator TYPE         JAXDETOX_TPU_ACCELERATOR  v4-8, v4-32, v5litepod-16, v5p-128, ...
#   --runtime-version VERSION  JAXDETOX_TPU_RUNTIME      default: by TPU generation (below)
#   --spot                     JAXDETOX_TPU_SPOT=1       spot capacity (preemptible, cheaper)
#   --dry-run                  JAXDETOX_DRY_RUN=1        print the gcloud commands, run nothing
# Script-specific arguments are left in the array JD_ARGS for the script's own parser.

set -euo pipefail

JD_NAME="${JAXDETOX_TPU_NAME:-}"
JD_PROJECT="${JAXDETOX_TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
JD_ZONE="${JAXDETOX_TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
JD_ACCELERATOR="${JAXDETOX_TPU_ACCELERATOR:-}"
JD_RUNTIME="${JAXDETOX_TPU_RUNTIME:-}"
JD_SPOT="${JAXDETOX_TPU_SPOT:-0}"
JD_DRY_RUN="${JAXDETOX_DRY_RUN:-0}"
JD_ARGS=()

# Where the checkout, configs and logs live on each worker (relative to the ssh user's home).
# shellcheck disable=SC2034  # used by the scripts that source this file
JD_REMOTE_DIR=jaxdetox-run

jd_die() {
  echo "error: $*" >&2
  exit 2
}

jd_usage_common() {
  sed -n '/^# Common flags/,/^# Script-specific/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Parse the common flags out of "$@"; everything else goes to JD_ARGS in order.
jd_parse_common() {
  while (($#)); do
    case "$1" in
      --name) JD_NAME="${2:?--name needs a value}"; shift 2 ;;
      --project) JD_PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --zone) JD_ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --accelerator) JD_ACCELERATOR="${2:?--accelerator needs a value}"; shift 2 ;;
      --runtime-version) JD_RUNTIME="${2:?--runtime-version needs a value}"; shift 2 ;;
      --spot) JD_SPOT=1; shift ;;
      --dry-run) JD_DRY_RUN=1; shift ;;
      *) JD_ARGS+=("$1"); shift ;;
    esac
  done
}

# The common flags as they were resolved (to hand on to another script).
jd_common_flags() {
  local flags=()
  [[ -n "$JD_PROJECT" ]] && flags+=(--project "$JD_PROJECT")
  [[ -n "$JD_ZONE" ]] && flags+=(--zone "$JD_ZONE")
  [[ -n "$JD_RUNTIME" ]] && flags+=(--runtime-version "$JD_RUNTIME")
  [[ "$JD_SPOT" == 1 ]] && flags+=(--spot)
  [[ "$JD_DRY_RUN" == 1 ]] && flags+=(--dry-run)
  printf '%s\n' "${flags[@]}"
}

# Fail unless each named setting is non-empty, naming its flag and variable.
jd_require() {
  local what
  for what in "$@"; do
    case "$what" in
      name) [[ -n "$JD_NAME" ]] || jd_die "--name (or JAXDETOX_TPU_NAME) is required" ;;
      project) [[ -n "$JD_PROJECT" ]] || jd_die "--project (or JAXDETOX_TPU_PROJECT) is required" ;;
      zone) [[ -n "$JD_ZONE" ]] || jd_die "--zone (or JAXDETOX_TPU_ZONE) is required" ;;
      accelerator)
        [[ -n "$JD_ACCELERATOR" ]] || jd_die "--accelerator (or JAXDETOX_TPU_ACCELERATOR) is required"
        ;;
      *) jd_die "jd_require: unknown setting $what" ;;
    esac
  done
}

# Number of hosts (TPU VM workers) of an accelerator type. v2-v5p types count TensorCores
# (2 per chip, 4 chips per host: v4-32 = 16 chips = 4 hosts); v5e / v6e types count chips
# (1, 4 or 8 chips: one host; larger slices: 4 chips per host, v5litepod-16 = 4 hosts).
jd_hosts() {
  local accel="$1" family count
  family="${accel%-*}"
  count="${accel##*-}"
  [[ "$count" =~ ^[0-9]+$ ]] || jd_die "accelerator $accel: expected TYPE-COUNT (e.g. v4-32)"
  case "$family" in
    v2 | v3 | v4 | v5p) echo $(((count + 7) / 8)) ;;
    v5litepod | v5e | v6e)
      if ((count <= 8)); then echo 1; else echo $((count / 4)); fi
      ;;
    *) jd_die "accelerator $accel: unknown TPU generation $family (v4, v5litepod, v5p, v6e)" ;;
  esac
}

# Default TPU VM runtime (software) version of a generation.
jd_default_runtime() {
  case "${1%-*}" in
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
    v5litepod | v5e) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) jd_die "accelerator $1: no default runtime version; pass --runtime-version" ;;
  esac
}

# One word quoted for a POSIX shell: bare when safe, else in single quotes.
jd_shquote() {
  local word="$1" q="'"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$q/$q\\$q$q}"
  fi
}

# Print a command (shell-quoted, prefixed with "+ ") and run it unless --dry-run.
jd_run() {
  printf '+ %s\n' "$(jd_quote "$@")"
  if [[ "$JD_DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# Flags every `gcloud compute tpus ...` call takes.
jd_where() {
  printf '%s\n' "--project=$JD_PROJECT" "--zone=$JD_ZONE"
}

# `gcloud compute tpus tpu-vm ssh` on WORKER (a number or "all") running COMMAND there.
jd_ssh() {
  local worker="$1" command="$2" where
  mapfile -t where < <(jd_where)
  jd_run gcloud compute tpus tpu-vm ssh "$JD_NAME" "${where[@]}" "--worker=$worker" \
    "--command=$command"
}

# `gcloud compute tpus tpu-vm scp` SRC DST on WORKER (a number or "all").
jd_scp() {
  local worker="$1" src="$2" dst="$3" where
  mapfile -t where < <(jd_where)
  jd_run gcloud compute tpus tpu-vm scp "$src" "$dst" "${where[@]}" "--worker=$worker"
}

# A shell-quoted command line from words (for --command strings run on the workers).
jd_quote() {
  local out="" word
  for word in "$@"; do
    out+="$(jd_shquote "$word") "
  done
  printf '%s' "${out% }"
}

# One line naming the slice and its workers (comment lines in --dry-run output).
jd_describe() {
  local hosts
  hosts="$(jd_hosts "$JD_ACCELERATOR")"
  echo "# ${JD_NAME}: ${JD_ACCELERATOR}, ${hosts} worker(s), zone ${JD_ZONE}, project ${JD_PROJECT}"
}

# Fill JD_ACCELERATOR from the TPU VM itself when no flag gave it (not in --dry-run).
jd_resolve_accelerator() {
  if [[ -z "$JD_ACCELERATOR" && "$JD_DRY_RUN" != 1 ]]; then
    local where
    mapfile -t where < <(jd_where)
    JD_ACCELERATOR="$(gcloud compute tpus tpu-vm describe "$JD_NAME" "${where[@]}" \
      --format='value(acceleratorType)')"
  fi
  jd_require accelerator
}
