#!/usr/bin/env bash
# Install jaxdetox (with JAX for TPUs: the `tpu` extra) on every worker of a TPU VM / slice.
#
#   tpu_scripts/install.sh --name jd-v4 --repo https://github.com/ORG/jaxdetox.git [--ref COMMIT]
#   tpu_scripts/install.sh --name jd-v4 --wheel        # build a wheel here, copy it, install it
#
# --repo URL   git clone URL on each worker (default: this checkout's `origin` remote) and
#              check out --ref (default: this checkout's HEAD commit; push it first).
# --wheel      `pip wheel` this checkout, scp the wheel to every worker and install it there.
# --extra X    extras to install (default: tpu). Common flags: see tpu_scripts/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

jd_parse_common "$@"
repo="" ref="" mode=git extra=tpu
set -- "${JD_ARGS[@]+"${JD_ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --repo) repo="${2:?--repo needs a URL}"; shift 2 ;;
    --ref) ref="${2:?--ref needs a commit, branch or tag}"; shift 2 ;;
    --wheel) mode=wheel; shift ;;
    --extra) extra="${2:?--extra needs a name}"; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0"; jd_usage_common; exit 0 ;;
    *) jd_die "install.sh: unknown argument $1" ;;
  esac
done
jd_require name project zone
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$JD_REMOTE_DIR"
pip="python3 -m pip install --quiet --upgrade"

if [[ "$mode" == git ]]; then
  repo="${repo:-$(git -C "$root" remote get-url origin 2>/dev/null || true)}"
  [[ -n "$repo" ]] || jd_die "--repo URL is required (this checkout has no origin remote)"
  ref="${ref:-$(git -C "$root" rev-parse HEAD)}"
  src="$dir/jaxdetox"
  remote="set -e; mkdir -p $dir"
  remote+="; if [ -d $src/.git ]; then git -C $src fetch --quiet origin; "
  remote+="else git clone --quiet $(jd_shquote "$repo") $src; fi"
  remote+="; git -C $src checkout --quiet $(jd_shquote "$ref")"
  remote+="; $pip -e \"${src}[$extra]\""
  jd_ssh all "$remote"
else
  version="$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$root/setup.py")"
  wheel="jaxdetox-${version}-py3-none-any.whl"
  jd_run python3 -m pip wheel --no-deps --quiet -w "$root/dist" "$root"
  jd_ssh all "mkdir -p $dir"
  jd_scp all "$root/dist/$wheel" "$JD_NAME:$dir/"
  jd_ssh all "set -e; $pip \"$dir/${wheel}[$extra]\""
fi
