#!/usr/bin/env bash
# Starts the same `python run.py ...` on every worker of the slice, detached, one log per worker.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_TAG="${RUN_TAG:-}"
ACTION="start"
LOCAL=0
UNLESS_RUNNING=0
ENV_ASSIGNMENTS=()
RUN_ARGS=()

USAGE="Usage: tpu_setup/launch.sh --name=TPU --zone=ZONE [options] [--] RUN_PY_ARGS...
       tpu_setup/launch.sh --name=TPU --zone=ZONE --stop
       tpu_setup/launch.sh --local [options] [--] RUN_PY_ARGS...   (on a worker; tpu_setup/startup.sh)

Runs 'python run.py RUN_PY_ARGS...' in REMOTE_DIR/.venv on every worker at once (--worker=all),
under nohup, so it survives the ssh session. Each worker writes its own log,
LOG_DIR/<tag>.worker<N>.log, and points LOG_DIR/latest.log at it (tpu_setup/logs.sh reads that).
On a slice with several hosts run.py calls jax.distributed.initialize() itself: every worker gets
the same command. Options of this script come first; the first other argument (or everything
after '--') goes to run.py unchanged.

  --env=KEY=VALUE      set an environment variable for run.py (repeatable), e.g. --env=LIBTPU_INIT_ARGS=...
  --tag=TAG            log file tag (default: UTC time, e.g. 20250101-120000)    [RUN_TAG]
  --remote-dir=DIR     checkout on the workers (default: mcpo_jax, under \$HOME) [REMOTE_DIR]
  --log-dir=DIR        log folder on the workers (default: mcpo_logs, under \$HOME) [LOG_DIR]
  --stop               stop the run started by this script (SIGTERM, then SIGKILL after 60 s)
  --unless-running     when a run started by this script is alive, leave it and exit 0 (default: fail)
  --local              start (or stop) the run here, on this machine, instead of over ssh;
                       no --name/--zone (what tpu_setup/startup.sh does at boot)

$COMMON_OPTS_HELP

Example (v5e-8):
  tpu_setup/launch.sh --name=mcpo-v5e --zone=us-west4-a -- \\
    --config=configs/multi_domain.py --config.workdir=gs://BUCKET/runs/first \\
    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1"

# shellcheck disable=SC2034  # some options are only read through export_vars
while (($#)); do
  if take_common_opt "$1"; then shift; continue; fi
  case "$1" in
    --env=*=*) ENV_ASSIGNMENTS+=("${1#--env=}") ;;
    --env=*) die "--env wants KEY=VALUE, got '$1'" ;;
    --tag=*) RUN_TAG="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --stop) ACTION="stop" ;;
    --unless-running) UNLESS_RUNNING=1 ;;
    --local) LOCAL=1 ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    --) shift; RUN_ARGS=("$@"); break ;;
    *) RUN_ARGS=("$@"); break ;;
  esac
  shift
done
if [[ "$LOCAL" != 1 ]]; then require_slice "$USAGE"; fi

for assignment in ${ENV_ASSIGNMENTS[@]+"${ENV_ASSIGNMENTS[@]}"}; do
  [[ "${assignment%%=*}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env: '${assignment%%=*}' is not a variable name"
done

# Runs SCRIPT on every worker over ssh, or here with --local.
run_script() {
  if [[ "$LOCAL" != 1 ]]; then
    tpu_ssh all "$(as_remote_command "$1")"
  elif [[ "$DRY_RUN" == 1 ]]; then
    printf '+ bash -c %q\n' "$1"
  else
    bash -c "$1"
  fi
}

# Remote: the run this script started, if it is still alive. The boot id beside the pid tells a pid
# file from an earlier boot (the slice restarted; that number may now be another process) from a
# live one.
heredoc RUN_STATE <<'BODY'
PID_FILE="$LOG_DIR/run.pid"
BOOT_ID_FILE="$LOG_DIR/run.boot_id"
this_boot() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || true; }
live_run_pid() {
  local pid boot
  [[ -f "$PID_FILE" ]] || return 1
  pid="$(cat "$PID_FILE")"
  boot="$(cat "$BOOT_ID_FILE" 2>/dev/null || true)"
  if [[ -n "$boot" && "$boot" != "$(this_boot)" ]]; then return 1; fi
  kill -0 "$pid" 2>/dev/null || return 1
  printf '%s' "$pid"
}
BODY

if [[ "$ACTION" == stop ]]; then
  ((${#RUN_ARGS[@]} == 0)) || die "--stop takes no run.py arguments (got: ${RUN_ARGS[*]})"
  heredoc STOP_BODY <<'BODY'
if ! pid="$(live_run_pid)"; then
  say "no run to stop"
  rm -f "$PID_FILE" "$BOOT_ID_FILE"
  exit 0
fi
say "stopping pid $pid"
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 60); do
  kill -0 "$pid" 2>/dev/null || { say "stopped"; rm -f "$PID_FILE" "$BOOT_ID_FILE"; exit 0; }
  sleep 1
done
say "pid $pid ignored SIGTERM for 60 s; sending SIGKILL"
kill -KILL "$pid" 2>/dev/null || true
rm -f "$PID_FILE" "$BOOT_ID_FILE"
BODY
  run_script "$(export_vars REMOTE_DIR LOG_DIR)
$REMOTE_PRELUDE
$RUN_STATE
$STOP_BODY"
  exit 0
fi

if ((${#RUN_ARGS[@]} == 0)); then
  printf '%s\n\n' "$USAGE" >&2
  die "no run.py arguments; at least --config=configs/multi_domain.py[:preset]"
fi
# One tag for the whole slice, chosen here, so that the workers' log names match.
RUN_TAG="${RUN_TAG:-$(date -u +%Y%m%d-%H%M%S)}"
[[ "$RUN_TAG" =~ ^[A-Za-z0-9._-]+$ ]] || die "--tag may only use letters, digits and . _ -"

# Arrays for the remote script, each element quoted for bash.
remote_arrays="RUN_ARGS=("
for arg in "${RUN_ARGS[@]}"; do remote_arrays+=" $(printf '%q' "$arg")"; done
remote_arrays+=" )
ENV_ASSIGNMENTS=("
for assignment in ${ENV_ASSIGNMENTS[@]+"${ENV_ASSIGNMENTS[@]}"}; do
  remote_arrays+=" $(printf '%q' "$assignment")"
done
remote_arrays+=" )"

heredoc START_BODY <<'BODY'
mkdir -p "$LOG_DIR"
if pid="$(live_run_pid)"; then
  if [[ "$UNLESS_RUNNING" == 1 ]]; then
    say "a run started by tpu_setup/launch.sh is alive here (pid $pid); leaving it as it is"
    exit 0
  fi
  fail "a run is still alive here (pid $pid); stop it first: tpu_setup/launch.sh ... --stop"
fi
cd "$REMOTE_DIR" 2>/dev/null || fail "$REMOTE_DIR is missing; run tpu_setup/install.sh first"
[[ -x .venv/bin/python ]] || fail "$REMOTE_DIR/.venv is missing; run tpu_setup/install.sh first"
[[ -f run.py ]] || fail "no run.py in $REMOTE_DIR"
LOG="$LOG_DIR/$RUN_TAG.worker$WORKER.log"
{
  printf '# %s  worker %s  host %s\n' "$(date -u +%FT%TZ)" "$WORKER" "$(hostname)"
  printf '# python run.py'
  printf ' %q' "${RUN_ARGS[@]}"
  printf '\n'
} >"$LOG"
ln -sfn "$(basename "$LOG")" "$LOG_DIR/latest.log"
nohup env ${ENV_ASSIGNMENTS[@]+"${ENV_ASSIGNMENTS[@]}"} PYTHONUNBUFFERED=1 \
  .venv/bin/python run.py "${RUN_ARGS[@]}" >>"$LOG" 2>&1 </dev/null &
echo "$!" >"$PID_FILE"
this_boot >"$BOOT_ID_FILE"
say "started pid $! on $(hostname), log $LOG"
BODY

SCRIPT="$(export_vars REMOTE_DIR LOG_DIR RUN_TAG UNLESS_RUNNING)
$remote_arrays
$REMOTE_PRELUDE
$RUN_STATE
$START_BODY"

if [[ "$LOCAL" == 1 ]]; then
  run_script "$SCRIPT"
  exit 0
fi
printf 'Launching on every worker of %s: python run.py %s\n' "$TPU_NAME" "${RUN_ARGS[*]}"
run_script "$SCRIPT"
printf '\nFollow worker 0: tpu_setup/logs.sh --name=%s --zone=%s%s\n' "$TPU_NAME" "$ZONE" "${PROJECT:+ --project=$PROJECT}"
