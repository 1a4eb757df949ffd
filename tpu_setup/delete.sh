#!/usr/bin/env bash
# Deletes the slice (every worker and its disk; what the runs wrote to gs:// stays), and the queued
# resource it came from, if any.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ASSUME_YES=0
ASYNC=()

USAGE="Usage: tpu_setup/delete.sh --name=TPU --zone=ZONE [--yes] [--async] [--queued-resource=ID]

When the slice came from a queued resource (tpu_setup/create.sh's default), deletes that with
'gcloud compute tpus queued-resources delete --force', which deletes its TPU VMs too; a request
still waiting in the queue is withdrawn. Otherwise (create.sh --direct) deletes the TPU VM / slice
with 'gcloud compute tpus tpu-vm delete'. Local files on the workers (the checkout, the venv, the
logs in LOG_DIR) go with it; checkpoints and metrics in gs:// stay.

  --yes                 do not ask for confirmation
  --async               return without waiting for the deletion to finish
  --queued-resource=ID  queued resource ID (default: the TPU name, as create.sh names it) [QR_ID]

$COMMON_OPTS_HELP"

while (($#)); do
  if take_common_opt "$1"; then shift; continue; fi
  case "$1" in
    --yes | -y) ASSUME_YES=1 ;;
    --async) ASYNC=(--async) ;;
    --queued-resource=*) QR_ID="${1#*=}" ;;
    --queued-resource) die "write $1=ID (with '=')" ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    *) printf '%s\n\n' "$USAGE" >&2; die "unknown argument: $1" ;;
  esac
  shift
done
require_slice "$USAGE"

# Is there a queued resource? (With --dry-run: unknown; both commands are printed.)
qr_state=""
if qr_state="$(qr_value 'value(state.state)')" && [[ -n "$qr_state" ]]; then
  what="queued resource '$QR_ID' ($qr_state) with TPU '$TPU_NAME'"
else
  qr_state=""
  what="TPU '$TPU_NAME'"
fi

if [[ "$ASSUME_YES" != 1 && "$DRY_RUN" != 1 ]]; then
  [[ -t 0 ]] || die "not a terminal, so cannot ask: pass --yes to delete $TPU_NAME"
  read -r -p "Delete $what in $ZONE${PROJECT:+ (project $PROJECT)} and everything on its disks? [y/N] " answer
  case "$answer" in
    y | Y | yes | YES) ;;
    *) echo "Not deleted."; exit 1 ;;
  esac
fi

# --quiet: the question was asked above (or waived with --yes).
if [[ -n "$qr_state" || "$DRY_RUN" == 1 ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then printf '# when queued resource %s exists:\n' "$QR_ID"; fi
  # --force: its TPU VMs go first, whatever state they are in.
  run_gcloud compute tpus queued-resources delete "$QR_ID" "${LOCATION_FLAGS[@]}" --force --quiet \
    ${ASYNC[@]+"${ASYNC[@]}"}
  if [[ "$DRY_RUN" != 1 ]]; then exit 0; fi
  printf '# otherwise (a slice made with create.sh --direct):\n'
fi
run_gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet ${ASYNC[@]+"${ASYNC[@]}"}
