#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): every remote command runs on ALL workers.
#
#   launch/tpu.sh [--dry-run] [options] COMMAND [-- main.py flags]
#
# Commands:
#   create   gcloud compute tpus tpu-vm create (accelerator type, runtime version)
#   copy     this repo's tracked files -> ~/pgm_jax on every worker (tarball + scp)
#   setup    idempotent per-host venv in ~/pgm_jax/.venv (pip install -e . and jax[tpu])
#   run      PGM_JAX_DISTRIBUTED=1 python -m pgm_jax.main "$@" on every worker, in the
#            background (log ~/pgm_jax.log, pid ~/pgm_jax.pid)
#   logs     last lines of ~/pgm_jax.log of every worker (--follow to stream)
#   stop     kill the process started by `run` (its pid file) on every worker
#   delete   gcloud compute tpus tpu-vm delete
#
# Options (or environment variables):
#   --name NAME        TPU_NAME                 (required)
#   --zone ZONE        TPU_ZONE                 (required)
#   --project PROJECT  TPU_PROJECT              (default: gcloud's configured project)
#   --type TYPE        TPU_TYPE=v4-32           accelerator type (create)
#   --version VERSION  TPU_VERSION=tpu-ubuntu2204-base   runtime version (create)
#   --spot                                      create a Spot VM (create)
#   --jax SPEC         TPU_JAX="jax[tpu]==0.10.2"        (setup)
#   --follow                                    logs: tail -f instead of the last 100 lines
#   --dry-run                                   print the exact commands, run nothing
#
# Example (OWT PGM 6/6 on a v4-32; data on every host or in GCS):
#   launch/tpu.sh --name=pgm --zone=us-central2-b create
#   launch/tpu.sh --name=pgm --zone=us-central2-b copy
#   launch/tpu.sh --name=pgm --zone=us-central2-b setup
#   launch/tpu.sh --name=pgm --zone=us-central2-b run -- --config=configs/owt.py:pgm_6_6 \
#       --workdir=gs://BUCKET/pgm_6_6 --config.data.data_dir=/data/owt_gpt2_1024
#   launch/tpu.sh --name=pgm --zone=us-central2-b logs
#
# There is deliberately no --worker option: a pod only runs when every host runs the
# same program (jax.distributed.initialize() waits for all of them).
set -euo pipefail

DRY_RUN=0
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
TYPE="${TPU_TYPE:-v4-32}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
JAX_SPEC="${TPU_JAX:-jax[tpu]==0.10.2}"
SPOT=0
FOLLOW=0
REMOTE_DIR='~/pgm_jax'
TARBALL="${TMPDIR:-/tmp}/pgm_jax_src.tgz"
COMMAND=""
MAIN_ARGS=()

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME="${1#*=}" ;;       --name) NAME="$2"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;       --zone) ZONE="$2"; shift ;;
    --project=*) PROJECT="${1#*=}" ;; --project) PROJECT="$2"; shift ;;
    --type=*) TYPE="${1#*=}" ;;       --type) TYPE="$2"; shift ;;
    --version=*) VERSION="${1#*=}" ;; --version) VERSION="$2"; shift ;;
    --jax=*) JAX_SPEC="${1#*=}" ;;    --jax) JAX_SPEC="$2"; shift ;;
    --spot) SPOT=1 ;;
    --follow) FOLLOW=1 ;;
    --worker*) die "--worker is not supported: every command runs on all workers of the pod" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    create|copy|setup|run|logs|stop|delete)
      [[ -z "$COMMAND" ]] || die "one command at a time (got $COMMAND and $1)"
      COMMAND="$1" ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || { usage; die "missing COMMAND"; }
[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
if [[ "$COMMAND" != run && ${#MAIN_ARGS[@]} -gt 0 ]]; then
  die "arguments after -- are only for 'run'"
fi

# Prints the command (shell-quoted) with --dry-run, else runs it.
x() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

# Runs a shell command on every worker of the slice.
on_all() { x "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$1"; }

quote_args() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

case "$COMMAND" in
  create)
    args=("${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$TYPE"
          --version="$VERSION")
    [[ $SPOT == 1 ]] && args+=(--spot)
    x "${args[@]}" ;;
  copy)
    repo_root="$(cd "$(dirname "$0")/.." && pwd)"
    if [[ $DRY_RUN == 1 ]]; then
      printf '+ (cd %q && git ls-files -z | tar --null -T - -czf %q)\n' "$repo_root" "$TARBALL"
    else
      (cd "$repo_root" && git ls-files -z | tar --null -T - -czf "$TARBALL")
    fi
    x "${GCLOUD[@]}" scp "$TARBALL" "$NAME:pgm_jax_src.tgz" "${COMMON[@]}" --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -xzf ~/pgm_jax_src.tgz -C $REMOTE_DIR && rm ~/pgm_jax_src.tgz" ;;
  setup)
    # Idempotent: the venv is created once; pip only installs what is missing.
    on_all "set -e; cd $REMOTE_DIR; test -x .venv/bin/python || python3 -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e . $(printf '%q' "$JAX_SPEC"); .venv/bin/python -c 'import jax, pgm_jax; print(jax.__version__)'" ;;
  run)
    [[ ${#MAIN_ARGS[@]} -gt 0 ]] || die "run needs main.py flags after --, e.g. -- --config=configs/owt.py:pgm_6_6 --workdir=gs://BUCKET/run"
    on_all "cd $REMOTE_DIR && PGM_JAX_DISTRIBUTED=1 nohup .venv/bin/python -m pgm_jax.main$(quote_args "${MAIN_ARGS[@]}") > ~/pgm_jax.log 2>&1 < /dev/null & echo \$! > ~/pgm_jax.pid" ;;
  logs)
    if [[ $FOLLOW == 1 ]]; then on_all "tail -f ~/pgm_jax.log"; else on_all "tail -n 100 ~/pgm_jax.log"; fi ;;
  stop)
    on_all "if test -f ~/pgm_jax.pid; then kill \$(cat ~/pgm_jax.pid) 2>/dev/null || true; rm -f ~/pgm_jax.pid; fi" ;;
  delete)
    x "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet ;;
esac
