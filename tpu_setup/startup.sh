#!/bin/bash
# Boot script of an mcpo_jax slice. tpu_setup/create.sh stores this file as the TPU VM's
# startup-script metadata, so the guest environment runs it as root on every boot of every worker:
# the first one, and again after a maintenance event or any other restart. Each time it
#   1. gets the code into REMOTE_DIR of the login account when it is not there (a fresh disk): from
#      a gs:// tarball or a git clone; code that is there stays as it was last installed,
#   2. installs it with `tpu_setup/install.sh --local` (the same steps install.sh runs over ssh),
#   3. starts the run.py command of the `mcpo-command` metadata with `tpu_setup/launch.sh --local`,
#      unless one is alive already. run.py resumes from the newest checkpoint in its gs:// workdir
#      (--config.resume=auto), so this is "rerun the same command" after a preemption (exit 75).
# Without `mcpo-command` it stops after step 2. Everything it does is safe to repeat; run it again
# by hand with `sudo google_metadata_script_runner startup`.
#
# Its settings are the instance metadata that create.sh writes (all optional but mcpo-user):
#   mcpo-user        account that owns the checkout (the one `tpu-vm ssh` logs in as)
#   mcpo-remote-dir  checkout, relative to that account's home    (default mcpo_jax)
#   mcpo-log-dir     run logs, relative to that account's home    (default mcpo_logs)
#   mcpo-python      Python X.Y for the venv                      (install.sh's default)
#   mcpo-code        gs://BUCKET/PATH.tar.gz: the packed checkout to unpack into REMOTE_DIR
#   mcpo-repo, mcpo-ref  git URL (and ref) to clone instead
#   mcpo-command     run.py arguments, one string, split like a shell would (quotes allowed)
#   mcpo-env         KEY=VALUE lines: environment for run.py
# Log: /var/log/mcpo-startup.log and the serial console (and the guest agent's journal).
set -euo pipefail
PATH="$PATH:/snap/bin:/usr/local/bin"  # gcloud lives in /snap/bin on Ubuntu images

LOG_FILE=/var/log/mcpo-startup.log
STATE_DIR=/var/lib/mcpo-startup
CONSOLE=/dev/ttyS0
[[ -w "$CONSOLE" ]] || CONSOLE=/dev/null
exec > >(tee -a "$LOG_FILE" "$CONSOLE") 2>&1

METADATA=http://metadata.google.internal/computeMetadata/v1/instance
metadata() {  # metadata KEY: the instance attribute, or nothing when it is not set
  curl -sf --max-time 10 -H 'Metadata-Flavor: Google' "$METADATA/attributes/$1" 2>/dev/null || true
}
WORKER="$(metadata agent-worker-number)"
WORKER="${WORKER:-0}"
log() { printf '%s mcpo-startup [worker %s] %s\n' "$(date -u +%FT%TZ)" "$WORKER" "$*"; }
fail() {
  log "error: $*"
  exit 1
}

# One copy at a time (a manual rerun while the boot run is still installing waits for nothing).
exec 8>/run/mcpo-startup.lock
flock -n 8 || { log "another copy of this script is running; leaving the work to it"; exit 0; }

RUN_USER="$(metadata mcpo-user)"
if [[ -z "$RUN_USER" ]]; then
  log "no mcpo-user metadata (this slice was not made by tpu_setup/create.sh); nothing to do"
  exit 0
fi
[[ "$RUN_USER" =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]] || fail "mcpo-user '$RUN_USER' is not an account name"
REMOTE_DIR="$(metadata mcpo-remote-dir)"
LOG_DIR="$(metadata mcpo-log-dir)"
PYTHON_VERSION="$(metadata mcpo-python)"
CODE_URL="$(metadata mcpo-code)"
REPO_URL="$(metadata mcpo-repo)"
REPO_REF="$(metadata mcpo-ref)"
COMMAND="$(metadata mcpo-command)"
RUN_ENV="$(metadata mcpo-env)"

# The account `gcloud compute tpus tpu-vm ssh` uses, made now if the guest agent has not made it yet,
# with the passwordless sudo such accounts get (install.sh apt-installs Python when it is missing).
if ! id "$RUN_USER" >/dev/null 2>&1; then
  log "creating account $RUN_USER"
  useradd --create-home --shell /bin/bash "$RUN_USER"
fi
SUDOERS="/etc/sudoers.d/90-mcpo-$RUN_USER"
if [[ ! -f "$SUDOERS" ]] && ! sudo -n -l -U "$RUN_USER" 2>/dev/null | grep -q NOPASSWD; then
  printf '%s ALL=(ALL:ALL) NOPASSWD:ALL\n' "$RUN_USER" >"$SUDOERS.tmp"
  chmod 440 "$SUDOERS.tmp"
  if visudo -cf "$SUDOERS.tmp" >/dev/null; then mv "$SUDOERS.tmp" "$SUDOERS"; else rm -f "$SUDOERS.tmp"; fi
fi
USER_HOME="$(getent passwd "$RUN_USER" | cut -d: -f6)"
[[ -d "$USER_HOME" ]] || fail "account $RUN_USER has no home directory"
# shellcheck disable=SC2088  # a literal "~" in the metadata, as the other tpu_setup scripts take it
under_home() {  # relative paths are under the account's home, as in the other tpu_setup scripts
  case "$1" in
    /*) printf '%s' "$1" ;;
    "~") printf '%s' "$USER_HOME" ;;
    "~/"*) printf '%s/%s' "$USER_HOME" "${1#"~/"}" ;;
    *) printf '%s/%s' "$USER_HOME" "$1" ;;
  esac
}
REMOTE_DIR="$(under_home "${REMOTE_DIR:-mcpo_jax}")"
LOG_DIR="$(under_home "${LOG_DIR:-mcpo_logs}")"
# A login shell of the account, as over ssh (its environment, its $HOME, its files).
as_user() { sudo -H -i -u "$RUN_USER" -- "$@"; }
log "boot: account $RUN_USER, code $REMOTE_DIR, logs $LOG_DIR"

# gs://BUCKET/OBJECT -> FILE with the VM's service account: gcloud when the image has it, else the
# JSON API with a token from the metadata server.
download() {
  local url="$1" out="$2" bucket object token
  if command -v gcloud >/dev/null && gcloud storage cp --quiet "$url" "$out"; then return 0; fi
  bucket="${url#gs://}"
  bucket="${bucket%%/*}"
  object="${url#gs://*/}"
  token="$(curl -sf --max-time 10 -H 'Metadata-Flavor: Google' "$METADATA/service-accounts/default/token" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')" || return 1
  object="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$object")"
  curl -sf --retry 5 --max-time 600 -H "Authorization: Bearer $token" -o "$out" \
    "https://storage.googleapis.com/storage/v1/b/$bucket/o/$object?alt=media"
}

# 1. The code, onto a fresh disk only: after a reboot the checkout stays as install.sh last left it.
cloned=0
if [[ -f "$REMOTE_DIR/tpu_setup/install.sh" ]]; then
  log "code found in $REMOTE_DIR; keeping it"
elif [[ -n "$CODE_URL" ]]; then
  tarball="$(mktemp /tmp/mcpo_jax_code.XXXXXX)"
  for attempt in 1 2 3; do
    if download "$CODE_URL" "$tarball"; then break; fi
    ((attempt < 3)) || fail "could not download $CODE_URL (the VM's service account needs read access: tpu_setup/README.md, bucket IAM)"
    log "download of $CODE_URL failed; retrying in 30 s"
    sleep 30
  done
  chown "$RUN_USER" "$tarball"
  as_user mkdir -p "$REMOTE_DIR"
  as_user tar -xzf "$tarball" -C "$REMOTE_DIR"
  rm -f "$tarball"
  log "unpacked $CODE_URL into $REMOTE_DIR"
elif [[ -n "$REPO_URL" ]]; then
  as_user git clone --quiet "$REPO_URL" "$REMOTE_DIR" || fail "git clone $REPO_URL failed"
  cloned=1
fi
if [[ ! -f "$REMOTE_DIR/tpu_setup/install.sh" ]]; then
  log "no code in $REMOTE_DIR (no mcpo-code or mcpo-repo metadata): run tpu_setup/install.sh;" \
    "this script installs and relaunches from it at the next boot"
  exit 0
fi

# 2. The install (install.sh's own steps; pip and apt need the network, so a failure is retried).
install_args=(--local --remote-dir="$REMOTE_DIR")
if [[ -n "$PYTHON_VERSION" ]]; then install_args+=(--python="$PYTHON_VERSION"); fi
if [[ "$cloned" == 1 ]]; then  # check out the ref
  install_args+=(--repo="$REPO_URL")
  if [[ -n "$REPO_REF" ]]; then install_args+=(--ref="$REPO_REF"); fi
fi
for attempt in 1 2 3; do
  if as_user bash "$REMOTE_DIR/tpu_setup/install.sh" "${install_args[@]}"; then break; fi
  ((attempt < 3)) || fail "tpu_setup/install.sh --local failed 3 times; see above"
  log "install failed; retrying in 60 s"
  sleep 60
done

# 3. The run.
if [[ -z "$COMMAND" ]]; then
  log "installed; no mcpo-command metadata, so no run is started (tpu_setup/launch.sh starts one)"
  exit 0
fi
mkdir -p "$STATE_DIR"
python3 -c 'import shlex, sys; sys.stdout.write("".join(a + "\0" for a in shlex.split(sys.argv[1])))' \
  "$COMMAND" >"$STATE_DIR/command.args" || fail "mcpo-command does not split into words: $COMMAND"
run_args=()
while IFS= read -r -d '' arg; do run_args+=("$arg"); done <"$STATE_DIR/command.args"
((${#run_args[@]})) || fail "mcpo-command is empty"
launch_args=(--local --unless-running --remote-dir="$REMOTE_DIR" --log-dir="$LOG_DIR")
while IFS= read -r assignment; do
  if [[ -n "$assignment" ]]; then launch_args+=(--env="$assignment"); fi
done <<<"$RUN_ENV"

# Log tag: boot1, boot2, ... counted per worker (the same on every worker of a slice booted together).
this_boot="$(cat /proc/sys/kernel/random/boot_id)"
boots="$(cat "$STATE_DIR/boots" 2>/dev/null || echo 0)"
if [[ "$(cat "$STATE_DIR/boot_id" 2>/dev/null || true)" != "$this_boot" ]]; then
  boots=$((boots + 1))
  printf '%s\n' "$boots" >"$STATE_DIR/boots"
  printf '%s\n' "$this_boot" >"$STATE_DIR/boot_id"
fi
launch_args+=(--tag="boot$boots")

log "starting: python run.py ${run_args[*]}"
launch=(bash "$REMOTE_DIR/tpu_setup/launch.sh" "${launch_args[@]}" -- "${run_args[@]}")
if command -v systemd-run >/dev/null; then
  # Its own scope, so the run outlives this script's service (and gets SIGTERM at shutdown).
  systemd-run --scope --quiet --description="mcpo_jax run (tpu_setup/startup.sh)" -- \
    sudo -H -i -u "$RUN_USER" -- "${launch[@]}"
else
  as_user "${launch[@]}"
fi
log "done; follow the run with tpu_setup/logs.sh (log $LOG_DIR/latest.log)"
