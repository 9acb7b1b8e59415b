#!/usr/bin/env bash
# Launch `jaxdetox run` on this node's GPUs with the recommended XLA flags
# (jaxdetox/launch/xla_flags.py, the one place they are kept).
#
#   gpu_scripts/launch.sh -- CONFIG.yaml --out runs/x [KEY=VALUE ...]           # 1 process, all GPUs
#   gpu_scripts/launch.sh --processes 8 -- CONFIG.yaml --out runs/x              # 1 process per GPU
#   gpu_scripts/launch.sh --coordinator HOST:PORT --num-processes N --process-id I -- ...
#                                                      # one node of a multi-node job (slurm.sbatch)
#
# --processes N      N local processes, each with its share of CUDA_VISIBLE_DEVICES (or of
#                    --gpus), joined through a coordinator on 127.0.0.1:--port (default 12355)
# --gpus LIST        GPU indices to use (default: CUDA_VISIBLE_DEVICES, else all of nvidia-smi)
# --coordinator ADDR, --num-processes N, --process-id I
#                    passed on to `jaxdetox run` (multi-node: this node is process I of N)
# --no-xla-flags     leave XLA_FLAGS and XLA_PYTHON_CLIENT_MEM_FRACTION as they are
# --dry-run          print the environment and commands, run nothing (JAXDETOX_DRY_RUN=1)
# Everything after `--` is the `jaxdetox run` command line.
set -euo pipefail

processes=1 gpus="${CUDA_VISIBLE_DEVICES:-}" port=12355 xla=1 dry="${JAXDETOX_DRY_RUN:-0}"
coordinator="" num_processes="" process_id="" run_args=()
die() {
  echo "error: $*" >&2
  exit 2
}
while (($#)); do
  case "$1" in
    --processes) processes="${2:?--processes needs a count}"; shift 2 ;;
    --gpus) gpus="${2:?--gpus needs a list like 0,1,2,3}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --coordinator) coordinator="${2:?--coordinator needs HOST:PORT}"; shift 2 ;;
    --num-processes) num_processes="${2:?--num-processes needs a count}"; shift 2 ;;
    --process-id) process_id="${2:?--process-id needs an index}"; shift 2 ;;
    --no-xla-flags) xla=0; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; run_args=("$@"); break ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "launch.sh: unknown argument $1 (the jaxdetox run arguments go after --)" ;;
  esac
done
((${#run_args[@]})) || die "nothing to run: gpu_scripts/launch.sh [flags] -- CONFIG.yaml --out RUN_DIR"
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || die "--processes $processes: expected a positive count"
if [[ -n "$coordinator" ]]; then
  [[ -n "$num_processes" && -n "$process_id" ]] ||
    die "--coordinator needs --num-processes and --process-id"
  ((processes == 1)) || die "--processes and --coordinator do not go together (one process per node)"
fi
python="${JAXDETOX_PYTHON:-python3}"

show() { # print a command, shell-quoted, prefixed with "+ "
  local word line="+"
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $word"; else line+=" '${word//\'/\'\\\'\'}'"; fi
  done
  echo "$line"
}

if [[ "$xla" == 1 ]]; then
  exports="$("$python" -m jaxdetox.launch.xla_flags gpu)"
  eval "$exports"
  [[ -z "$exports" ]] || echo "# ${exports//$'\n'/$'\n'# }"
fi

cli=("$python" -m jaxdetox.cli run)
if ((processes == 1)); then
  cmd=("${cli[@]}")
  [[ -z "$coordinator" ]] ||
    cmd+=(--coordinator "$coordinator" --num-processes "$num_processes" --process-id "$process_id")
  cmd+=("${run_args[@]}")
  [[ -z "$gpus" ]] || cmd=(env "CUDA_VISIBLE_DEVICES=$gpus" "${cmd[@]}")
  show "${cmd[@]}"
  [[ "$dry" == 1 ]] || exec "${cmd[@]}"
  exit 0
fi

# Several processes on this node: split the GPUs evenly, one coordinator on this host.
if [[ -z "$gpus" ]]; then
  if [[ "$dry" == 1 ]] || ! command -v nvidia-smi >/dev/null; then
    die "--processes $processes: pass --gpus (or CUDA_VISIBLE_DEVICES); nvidia-smi not used"
  fi
  gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
fi
IFS=, read -r -a all_gpus <<<"$gpus"
((${#all_gpus[@]} % processes == 0)) ||
  die "--processes $processes does not divide the ${#all_gpus[@]} GPUs ($gpus)"
per=$((${#all_gpus[@]} / processes))
pids=()
for ((i = 0; i < processes; i++)); do
  mine="$(IFS=,; echo "${all_gpus[*]:i*per:per}")"
  cmd=(env "CUDA_VISIBLE_DEVICES=$mine" "${cli[@]}" --coordinator "127.0.0.1:$port"
    --num-processes "$processes" --process-id "$i" "${run_args[@]}")
  show "${cmd[@]}"
  if [[ "$dry" != 1 ]]; then
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]+"${pids[@]}"}"; do
  wait "$pid" || status=$?
done
exit "$status"
