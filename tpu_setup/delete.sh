#!/usr/bin/env bash
# Deletes the slice (every worker and its disk; what the runs wrote to gs:// stays).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ASSUME_YES=0
ASYNC=()

USAGE="Usage: tpu_setup/delete.sh --name=TPU --zone=ZONE [--yes] [--async]

Deletes the TPU VM / slice with 'gcloud compute tpus tpu-vm delete'. Local files on the workers
(the checkout, the venv, the logs in LOG_DIR) go with it; checkpoints and metrics in gs:// stay.

  --yes     do not ask for confirmation
  --async   return without waiting for the deletion to finish

$COMMON_OPTS_HELP"

while (($#)); do
  if take_common_opt "$1"; then shift; continue; fi
  case "$1" in
    --yes | -y) ASSUME_YES=1 ;;
    --async) ASYNC=(--async) ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    *) printf '%s\n\n' "$USAGE" >&2; die "unknown argument: $1" ;;
  esac
  shift
done
require_slice "$USAGE"

if [[ "$ASSUME_YES" != 1 && "$DRY_RUN" != 1 ]]; then
  [[ -t 0 ]] || die "not a terminal, so cannot ask: pass --yes to delete $TPU_NAME"
  read -r -p "Delete TPU '$TPU_NAME' in $ZONE${PROJECT:+ (project $PROJECT)} and everything on its disks? [y/N] " answer
  case "$answer" in
    y | Y | yes | YES) ;;
    *) echo "Not deleted."; exit 1 ;;
  esac
fi

# --quiet: the question was asked above (or waived with --yes).
run_gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet ${ASYNC[@]+"${ASYNC[@]}"}
