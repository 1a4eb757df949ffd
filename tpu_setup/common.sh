# shellcheck shell=bash disable=SC2034  # the variables here are read by the scripts that source this
# Sourced by the tpu_setup scripts: which slice to talk to and how to reach its workers.
# Kept to bash 3.2 features so the scripts also run from a stock macOS shell.

TPU_NAME="${TPU_NAME:-${NAME:-}}"   # NAME is accepted too; TPU_NAME wins when both are set
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"              # empty: gcloud's configured core/project
REMOTE_DIR="${REMOTE_DIR:-mcpo_jax}"  # checkout on every worker; relative paths are under $HOME
LOG_DIR="${LOG_DIR:-mcpo_logs}"       # run logs on every worker; relative paths are under $HOME
DRY_RUN="${DRY_RUN:-0}"
QR_ID="${QR_ID:-}"                  # queued resource of the slice (create.sh, delete.sh); default: TPU_NAME
# Extra flags for every `tpu-vm ssh` / `tpu-vm scp`, e.g. TPU_SSH_FLAGS="--internal-ip".
read -r -a TPU_SSH_EXTRA <<< "${TPU_SSH_FLAGS:-}"

TPU_SETUP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_SETUP_DIR/.." && pwd)"

# `jax==X` (or `jax[extra]==X`) in requirements.txt; group 2 is the version. Not jaxlib, flax, ...
JAX_PIN_ERE='^[[:space:]]*jax(\[[^]]*\])?[[:space:]]*==[[:space:]]*([0-9][^[:space:];#,]*)'
LIBTPU_FIND_LINKS="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

COMMON_OPTS_HELP="Slice options (or the environment variables in brackets):
  --name=TPU        TPU VM / slice name            [TPU_NAME, or NAME]
  --zone=ZONE       its zone, e.g. us-east5-b      [ZONE]
  --project=ID      Google Cloud project           [PROJECT; default: gcloud config]
  --dry-run         print the gcloud commands instead of running them  [DRY_RUN=1]
Every ssh/scp also gets the flags in TPU_SSH_FLAGS (e.g. \"--internal-ip\")."

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Consumes one shared option; returns 1 when "$1" is not one of them.
take_common_opt() {
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --zone | --project) die "write $1=VALUE (with '=')" ;;
    *) return 1 ;;
  esac
}

# Exits with the script's usage when the slice is not named. $1: the usage text.
require_slice() {
  local missing=""
  if [[ -z "$TPU_NAME" ]]; then missing="--name (or TPU_NAME)"; fi
  if [[ -z "$ZONE" ]]; then missing="${missing:+$missing and }--zone (or ZONE)"; fi
  if [[ -n "$missing" ]]; then
    printf '%s\n\n' "$1" >&2
    printf 'error: missing %s\n' "$missing" >&2
    exit 2
  fi
  QR_ID="${QR_ID:-$TPU_NAME}"
  LOCATION_FLAGS=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then LOCATION_FLAGS+=(--project="$PROJECT"); fi
}

# heredoc VAR <<'END' ... END: stores the text in VAR (unlike $(cat <<...), safe in bash 3.2).
heredoc() {
  IFS= read -r -d '' "$1" || true
}

# Runs (or, with --dry-run, prints) one gcloud command.
run_gcloud() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  gcloud "$@"
}

# Runs a gcloud command whose output the caller reads, e.g. x="$(query_gcloud ... describe ...)".
# With --dry-run it prints the command on stderr and fails: there is nothing to read.
query_gcloud() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    return 1
  fi
  gcloud "$@"
}

# qr_value FORMAT: one field of queued resource $QR_ID, e.g. qr_value 'value(state.state)'.
# Fails when it does not exist (or cannot be read); gcloud's own message goes to /dev/null.
qr_value() {
  local args=(compute tpus queued-resources describe "$QR_ID" "${LOCATION_FLAGS[@]}" --format="$1")
  if [[ "$DRY_RUN" == 1 ]]; then
    query_gcloud "${args[@]}"
    return 1
  fi
  gcloud "${args[@]}" 2>/dev/null
}

# pack_checkout TARBALL: this checkout's files (tracked + untracked, minus .gitignore'd ones) as a
# .tar.gz, after checking the jax== pin that the TPU install reads. Sets JAX_VERSION.
pack_checkout() {
  local tarball="$1"
  # Fail here, not on every worker, when the pin the TPU install depends on is missing.
  [[ -f "$REPO_ROOT/requirements.txt" ]] || die "no requirements.txt in $REPO_ROOT"
  JAX_VERSION="$(sed -n -E "/$JAX_PIN_ERE/{s/$JAX_PIN_ERE.*/\\2/p;q;}" "$REPO_ROOT/requirements.txt")"
  [[ -n "$JAX_VERSION" ]] || die "$REPO_ROOT/requirements.txt has no 'jax==X.Y.Z' line; pin jax there"
  printf 'Packing %s (jax==%s)\n' "$REPO_ROOT" "$JAX_VERSION"
  export COPYFILE_DISABLE=1  # no macOS ._* files in the archive
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' path; do
        if [[ -e "$REPO_ROOT/$path" ]]; then printf '%s\0' "$path"; fi  # skip deleted files
      done |
      tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
  else
    tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude=./workdir --exclude=./runs -czf "$tarball" .
  fi
}

# tpu_ssh WORKER COMMAND: COMMAND runs in the login shell (bash) of worker WORKER ("all" = every
# worker at once).
tpu_ssh() {
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker="$1" \
    ${TPU_SSH_EXTRA[@]+"${TPU_SSH_EXTRA[@]}"} --command="$2"
}

# Prints shell assignments NAME=<quoted value> for the named variables, so that a remote script
# gets local values without any further quoting.
export_vars() {
  local var
  for var in "$@"; do
    printf '%s=%q\n' "$var" "${!var}"
  done
}

# Wraps a script so that `bash` runs it on the worker whatever the login shell makes of it.
as_remote_command() {
  printf 'bash -c %q' "$1"
}

# Remote prelude: strict mode, the two directories made absolute (relative ones are under $HOME),
# and the worker's index in the slice (from the TPU VM metadata server; 0 where there is none).
heredoc REMOTE_PRELUDE <<'PRELUDE'
set -euo pipefail
cd "$HOME"
absolute() {
  case "$1" in
    "~") printf '%s' "$HOME" ;;
    "~/"*) printf '%s/%s' "$HOME" "${1#"~/"}" ;;
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$HOME" "$1" ;;
  esac
}
REMOTE_DIR="$(absolute "$REMOTE_DIR")"
LOG_DIR="$(absolute "$LOG_DIR")"
WORKER="$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
  2>/dev/null || echo 0)"
say() { printf '[worker %s] %s\n' "$WORKER" "$*"; }
fail() { printf '[worker %s] error: %s\n' "$WORKER" "$*" >&2; exit 1; }
PRELUDE
