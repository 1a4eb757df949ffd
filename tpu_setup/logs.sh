#!/usr/bin/env bash
# Streams one worker's run log (worker 0 by default) from the slice.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER_INDEX=0
LINES=200
FOLLOW=1
LOG_FILE="latest.log"

USAGE="Usage: tpu_setup/logs.sh --name=TPU --zone=ZONE [--worker=N] [--lines=N] [--no-follow] [--file=NAME]

Prints the last lines of a worker's log from tpu_setup/launch.sh and keeps following it (Ctrl-C ends).

  --worker=N       which worker (default 0; in a slice with several hosts, worker 0 is process 0)
  --lines=N        lines of history first (default 200)
  --no-follow      print and exit
  --file=NAME      a log in LOG_DIR other than latest.log, e.g. 20250101-120000.worker3.log
  --log-dir=DIR    log folder on the workers (default: mcpo_logs, under \$HOME) [LOG_DIR]

$COMMON_OPTS_HELP"

# shellcheck disable=SC2034  # some options are only read through export_vars
while (($#)); do
  if take_common_opt "$1"; then shift; continue; fi
  case "$1" in
    --worker=*) WORKER_INDEX="${1#*=}" ;;
    --lines=*) LINES="${1#*=}" ;;
    --no-follow) FOLLOW=0 ;;
    --file=*) LOG_FILE="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    *) printf '%s\n\n' "$USAGE" >&2; die "unknown argument: $1" ;;
  esac
  shift
done
require_slice "$USAGE"
[[ "$WORKER_INDEX" =~ ^[0-9]+$ ]] || die "--worker wants one worker index (0, 1, ...), got '$WORKER_INDEX'"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines wants a number, got '$LINES'"

heredoc BODY <<'BODY'
LOG="$LOG_DIR/$LOG_FILE"
[[ -e "$LOG" ]] || fail "no $LOG yet (has tpu_setup/launch.sh run on this slice?)"
if [[ "$FOLLOW" == 1 ]]; then
  exec tail -n "$LINES" -F "$LOG"
fi
exec tail -n "$LINES" "$LOG"
BODY

# A terminal lets Ctrl-C reach the remote tail instead of leaving it behind.
if [[ "$FOLLOW" == 1 && -t 0 && -t 1 ]]; then TPU_SSH_EXTRA+=(--ssh-flag=-t); fi
tpu_ssh "$WORKER_INDEX" "$(as_remote_command "$(export_vars REMOTE_DIR LOG_DIR LOG_FILE LINES FOLLOW)
$REMOTE_PRELUDE
$BODY")"
