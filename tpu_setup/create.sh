#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host) or pod slice (several hosts) for mcpo_jax.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
CAPACITY=""  # "", --spot or --preemptible
EXTRA_FLAGS=()

USAGE="Usage: tpu_setup/create.sh --name=TPU --zone=ZONE --accelerator-type=TYPE [options] [-- GCLOUD_FLAGS...]

Creates the slice with 'gcloud compute tpus tpu-vm create'.

  --accelerator-type=TYPE  e.g. v5litepod-8, v5p-64, v6e-256    [ACCELERATOR_TYPE]
  --version=RUNTIME        TPU software version                  [RUNTIME_VERSION]
                           default by generation: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
                           v5litepod -> v2-alpha-tpuv5-lite, v4/v3/v2 -> tpu-ubuntu2204-base
  --spot                   Spot capacity (cheaper, can be preempted at any time)
  --preemptible            legacy preemptible capacity (cheaper, preemptible, at most 24 h)
  -- GCLOUD_FLAGS...       passed on to gcloud as they are, e.g. --service-account=SA,
                           --network=NET --subnetwork=SUBNET, --internal-ips, --reserved

$COMMON_OPTS_HELP

Example:
  tpu_setup/create.sh --name=mcpo-v5e --zone=us-west4-a --accelerator-type=v5litepod-8 --spot"

while (($#)); do
  if take_common_opt "$1"; then shift; continue; fi
  case "$1" in
    --accelerator-type=* | --type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=* | --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --spot | --preemptible)
      if [[ -n "$CAPACITY" && "$CAPACITY" != "$1" ]]; then die "--spot and --preemptible exclude each other"; fi
      CAPACITY="$1"
      ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    --) shift; EXTRA_FLAGS=("$@"); break ;;
    *) printf '%s\n\n' "$USAGE" >&2; die "unknown argument: $1" ;;
  esac
  shift
done

if [[ -z "$ACCELERATOR_TYPE" ]]; then
  printf '%s\n\n' "$USAGE" >&2
  printf 'error: missing --accelerator-type (or ACCELERATOR_TYPE)\n' >&2
  exit 2
fi
require_slice "$USAGE"

case "$ACCELERATOR_TYPE" in
  v5e-*) die "v5e slices are named v5litepod-N in gcloud: use --accelerator-type=v5litepod-${ACCELERATOR_TYPE#v5e-}" ;;
esac

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v4-* | v3-* | v2-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default TPU software version for '$ACCELERATOR_TYPE'; pass --version=... (list them: gcloud compute tpus tpu-vm versions list --zone=$ZONE)" ;;
  esac
fi

args=(compute tpus tpu-vm create "$TPU_NAME" "${LOCATION_FLAGS[@]}"
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ -n "$CAPACITY" ]]; then args+=("$CAPACITY"); fi
if ((${#EXTRA_FLAGS[@]})); then args+=("${EXTRA_FLAGS[@]}"); fi

printf 'Creating %s (%s, software %s%s) in %s\n' "$TPU_NAME" "$ACCELERATOR_TYPE" "$RUNTIME_VERSION" \
  "${CAPACITY:+, ${CAPACITY#--}}" "$ZONE"
run_gcloud "${args[@]}"

cat <<NEXT

Next: install the project on every worker, then launch:
  tpu_setup/install.sh --name=$TPU_NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT}
  tpu_setup/launch.sh  --name=$TPU_NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT} --config=configs/multi_domain.py ...
NEXT
