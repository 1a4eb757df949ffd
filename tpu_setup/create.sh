#!/usr/bin/env bash
# Requests a Cloud TPU VM (one host) or pod slice (several hosts) for mcpo_jax: a queued resource by
# default, waited on until ACTIVE; `tpu-vm create` with --direct. Either way the VM gets
# tpu_setup/startup.sh as its startup script (install, then optionally the run, on every boot).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
CAPACITY=""  # "", --spot or --preemptible
DIRECT=0
WAIT="${WAIT:-2h}"
VALID_UNTIL=""
REPLACE=0
POLL_S="${POLL_S:-30}"
CODE_URL=""
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
RUN_COMMAND=""
RUN_ENV=()
RUN_USER="${TPU_USER:-${USER:-$(id -un)}}"
PYTHON_VERSION="${PYTHON_VERSION:-}"
EXTRA_FLAGS=()

USAGE="Usage: tpu_setup/create.sh --name=TPU --zone=ZONE --accelerator-type=TYPE [options] [-- GCLOUD_FLAGS...]

Requests the slice as a queued resource ('gcloud compute tpus queued-resources create', ID = the TPU
name unless --queued-resource=ID) and waits until it is ACTIVE, printing its state as it changes.
The request waits in Google's queue for capacity instead of failing when there is none at this moment.

  --accelerator-type=TYPE  e.g. v5litepod-8, v5p-64, v6e-256    [ACCELERATOR_TYPE]
  --version=RUNTIME        TPU software version                  [RUNTIME_VERSION]
                           default by generation: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
                           v5litepod -> v2-alpha-tpuv5-lite, v4/v3/v2 -> tpu-ubuntu2204-base
  --spot                   Spot capacity (cheaper, can be preempted at any time)
  --wait=DURATION          wait at most this long for ACTIVE, e.g. 90m, 6h (default 2h) [WAIT]
  --no-wait                return once the request is queued (same as --wait=0)
  --valid-until=DURATION   the queue drops the request if not served within DURATION
                           (gcloud --valid-until-duration, e.g. 6h, 2d)
  --replace                a FAILED or SUSPENDED (e.g. preempted) queued resource of the same ID is
                           deleted first; without it create.sh stops and says so
  --queued-resource=ID     queued resource ID (default: the TPU name)            [QR_ID]
  --direct                 'gcloud compute tpus tpu-vm create' instead: no queue, fails when the
                           zone has no capacity now
  --preemptible            with --direct: legacy preemptible capacity (at most 24 h)

Boot script (tpu_setup/startup.sh, run as root on every boot of every worker):
  --code=gs://BUCKET/PATH.tar.gz  pack this checkout (as install.sh does), upload it there; a
                           worker with a fresh disk installs from it (a folder ending in / gets
                           NAME.tar.gz). The VM's service account needs read access (README).
  --repo=URL [--ref=REF]   or: a fresh worker git-clones URL at REF
  --command='RUN_PY_ARGS'  after the install, start 'python run.py RUN_PY_ARGS' on every worker at
                           every boot (like launch.sh; a live run is left alone). It resumes from
                           the newest checkpoint, so it needs --config.workdir=gs://... and --code
                           or --repo. Split into words like a shell would (quotes allowed).
  --env=KEY=VALUE          environment for that command (repeatable)
  --user=NAME              account on the workers that owns the checkout (default: \$USER, the
                           name 'tpu-vm ssh' logs in with; with OS Login, your POSIX name) [TPU_USER]
  --remote-dir=DIR, --log-dir=DIR, --python=X.Y   as in install.sh and launch.sh
Without --code/--repo/--command the boot script only reinstalls what install.sh put on the disk.

  -- GCLOUD_FLAGS...       passed on to gcloud as they are, e.g. --service-account=SA,
                           --network=NET --subnetwork=SUBNET, --internal-ips, --reserved

$COMMON_OPTS_HELP

Examples:
  tpu_setup/create.sh --name=mcpo-v5e --zone=us-west4-a --accelerator-type=v5litepod-8 --spot
  tpu_setup/create.sh --name=mcpo-v5p --zone=us-east5-a --accelerator-type=v5p-64 --spot --replace \\
    --code=gs://BUCKET/code/ --command='--config=configs/multi_domain.py:qwen2.5-7b-instruct
    --config.workdir=gs://BUCKET/runs/qwen2.5-7b-mcpo --config.mesh.fsdp=-1'"

while (($#)); do
  if take_common_opt "$1"; then shift; continue; fi
  case "$1" in
    --accelerator-type=* | --type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=* | --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --spot | --preemptible)
      if [[ -n "$CAPACITY" && "$CAPACITY" != "$1" ]]; then die "--spot and --preemptible exclude each other"; fi
      CAPACITY="$1"
      ;;
    --wait=*) WAIT="${1#*=}" ;;
    --no-wait) WAIT=0 ;;
    --valid-until=*) VALID_UNTIL="${1#*=}" ;;
    --replace) REPLACE=1 ;;
    --queued-resource=*) QR_ID="${1#*=}" ;;
    --direct) DIRECT=1 ;;
    --code=*) CODE_URL="${1#*=}" ;;
    --repo=*) REPO_URL="${1#*=}" ;;
    --ref=*) REPO_REF="${1#*=}" ;;
    --command=*) RUN_COMMAND="${1#*=}" ;;
    --env=*=*) RUN_ENV+=("${1#--env=}") ;;
    --env=*) die "--env wants KEY=VALUE, got '$1'" ;;
    --user=*) RUN_USER="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --wait | --valid-until | --queued-resource | --code | --repo | --ref | --command | --user | --env)
      die "write $1=VALUE (with '=')" ;;
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

# Seconds in DURATION: N (seconds), Ns, Nm, Nh or Nd.
duration_s() {
  case "$1" in
    *[!0-9smhd]* | "" | [smhd]*) return 1 ;;
    *s) [[ "${1%s}" =~ ^[0-9]+$ ]] && printf '%s' "$((10#${1%s}))" ;;
    *m) [[ "${1%m}" =~ ^[0-9]+$ ]] && printf '%s' "$((10#${1%m} * 60))" ;;
    *h) [[ "${1%h}" =~ ^[0-9]+$ ]] && printf '%s' "$((10#${1%h} * 3600))" ;;
    *d) [[ "${1%d}" =~ ^[0-9]+$ ]] && printf '%s' "$((10#${1%d} * 86400))" ;;
    *) [[ "$1" =~ ^[0-9]+$ ]] && printf '%s' "$((10#$1))" ;;
  esac
}
# 3725 -> 1h02m05s
elapsed() {
  local s="$1"
  if ((s >= 3600)); then printf '%dh%02dm%02ds' $((s / 3600)) $((s % 3600 / 60)) $((s % 60))
  elif ((s >= 60)); then printf '%dm%02ds' $((s / 60)) $((s % 60))
  else printf '%ds' "$s"; fi
}

WAIT_S="$(duration_s "$WAIT")" || die "--wait wants a duration like 90m, 6h or 0 (got '$WAIT')"
[[ "$POLL_S" =~ ^[1-9][0-9]*$ ]] || die "POLL_S wants a number of seconds (got '$POLL_S')"
if [[ "$DIRECT" == 1 ]]; then
  if [[ "$REPLACE" == 1 || -n "$VALID_UNTIL" ]]; then die "--replace and --valid-until are for queued resources (drop --direct)"; fi
elif [[ "$CAPACITY" == --preemptible ]]; then
  die "queued resources have no --preemptible; use --spot (or --direct --preemptible)"
fi
for flag in ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}; do
  case "$flag" in
    --metadata-from-file*) die "create.sh sets --metadata-from-file itself (the startup script); pass other metadata with --metadata=KEY=VALUE" ;;
  esac
done
if [[ -n "$REPO_REF" && -z "$REPO_URL" ]]; then die "--ref needs --repo"; fi
if [[ -n "$CODE_URL" && -n "$REPO_URL" ]]; then die "--code and --repo exclude each other"; fi
if [[ -n "$CODE_URL" ]]; then
  [[ "$CODE_URL" == gs://?*/* ]] || die "--code wants gs://BUCKET/PATH.tar.gz or gs://BUCKET/FOLDER/ (got '$CODE_URL')"
  if [[ "$CODE_URL" == */ ]]; then CODE_URL="$CODE_URL$TPU_NAME.tar.gz"; fi
fi
if [[ -n "$RUN_COMMAND" ]]; then
  [[ -n "$CODE_URL" || -n "$REPO_URL" ]] ||
    die "--command needs --code=gs://... or --repo=URL: a worker must find the code at its first boot"
  [[ "$RUN_COMMAND" == *--config.workdir=gs://* ]] ||
    die "--command needs --config.workdir=gs://...: a restarted or recreated slice resumes from there"
  [[ "$RUN_COMMAND" == *--config=* ]] || die "--command wants run.py arguments, at least --config=configs/..."
elif ((${#RUN_ENV[@]})); then
  die "--env is for --command"
fi
for assignment in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
  [[ "${assignment%%=*}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env: '${assignment%%=*}' is not a variable name"
done
[[ "$RUN_USER" =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]] || die "--user: '$RUN_USER' is not an account name"
if [[ -n "$PYTHON_VERSION" && ! "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]]; then
  die "--python wants X.Y, e.g. 3.12 (got '$PYTHON_VERSION')"
fi

# An earlier request with this ID: wait on it again (a rerun after --wait ran out), or replace it.
wait_on_existing=0
if [[ "$DIRECT" != 1 ]] && existing="$(qr_value 'value(state.state)')" && [[ -n "$existing" ]]; then
  case "$existing" in
    FAILED | SUSPENDED)
      [[ "$REPLACE" == 1 ]] || die "queued resource $QR_ID exists and is $existing; pass --replace to delete and request it again (or tpu_setup/delete.sh)"
      printf 'Deleting queued resource %s (%s) first (--replace)\n' "$QR_ID" "$existing"
      run_gcloud compute tpus queued-resources delete "$QR_ID" "${LOCATION_FLAGS[@]}" --force --quiet
      ;;
    CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | ACTIVE)
      printf 'Queued resource %s was requested before and is %s: waiting on it (this run'"'"'s settings are not applied)\n' \
        "$QR_ID" "$existing"
      wait_on_existing=1
      ;;
    *) die "queued resource $QR_ID exists and is $existing; wait for it to settle, or delete it: tpu_setup/delete.sh" ;;
  esac
fi

if [[ "$wait_on_existing" != 1 ]]; then
  # The startup script and its settings, as files: --metadata-from-file takes any text, commas too.
  META_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mcpo_create.XXXXXX")"
  trap 'rm -rf "$META_DIR"' EXIT
  cp "$TPU_SETUP_DIR/startup.sh" "$META_DIR/startup-script"
  META_FILES=("startup-script=$META_DIR/startup-script")
  set_metadata() {  # set_metadata KEY VALUE (nothing for an empty VALUE)
    if [[ -z "$2" ]]; then return 0; fi
    printf '%s' "$2" >"$META_DIR/$1"
    META_FILES+=("$1=$META_DIR/$1")
    printf '  metadata %s: %s\n' "$1" "$2"
  }
  printf 'Boot script: tpu_setup/startup.sh\n'
  set_metadata mcpo-user "$RUN_USER"
  set_metadata mcpo-remote-dir "$REMOTE_DIR"
  set_metadata mcpo-log-dir "$LOG_DIR"
  set_metadata mcpo-python "$PYTHON_VERSION"
  set_metadata mcpo-code "$CODE_URL"
  set_metadata mcpo-repo "$REPO_URL"
  set_metadata mcpo-ref "$REPO_REF"
  set_metadata mcpo-command "$RUN_COMMAND"
  if ((${#RUN_ENV[@]})); then set_metadata mcpo-env "$(printf '%s\n' "${RUN_ENV[@]}")"; fi
  metadata_flag="--metadata-from-file=$(IFS=,; printf '%s' "${META_FILES[*]}")"

  if [[ -n "$CODE_URL" ]]; then
    pack_checkout "$META_DIR/code.tar.gz"
    printf 'Uploading %s to %s\n' "$(du -h "$META_DIR/code.tar.gz" | cut -f1)" "$CODE_URL"
    run_gcloud storage cp "$META_DIR/code.tar.gz" "$CODE_URL"
  fi

  if [[ "$DIRECT" == 1 ]]; then
    args=(compute tpus tpu-vm create "$TPU_NAME" "${LOCATION_FLAGS[@]}"
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$metadata_flag")
  else
    args=(compute tpus queued-resources create "$QR_ID" --node-id="$TPU_NAME" "${LOCATION_FLAGS[@]}"
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "$metadata_flag")
    if [[ -n "$VALID_UNTIL" ]]; then args+=(--valid-until-duration="$VALID_UNTIL"); fi
  fi
  if [[ -n "$CAPACITY" ]]; then args+=("$CAPACITY"); fi
  if ((${#EXTRA_FLAGS[@]})); then args+=("${EXTRA_FLAGS[@]}"); fi

  what="Requesting queued resource $QR_ID for"
  if [[ "$DIRECT" == 1 ]]; then what="Creating"; fi
  printf '%s %s (%s, software %s%s) in %s\n' "$what" "$TPU_NAME" "$ACCELERATOR_TYPE" "$RUNTIME_VERSION" \
    "${CAPACITY:+, ${CAPACITY#--}}" "$ZONE"
  run_gcloud "${args[@]}"
fi

LOCATION_TEXT="--name=$TPU_NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT}"
describe_command="gcloud compute tpus queued-resources describe $QR_ID --zone=$ZONE${PROJECT:+ --project=$PROJECT}"

# Polls the queued resource until ACTIVE; one line whenever the state changes (and every 10 polls).
wait_until_active() {
  local start="$SECONDS" state="" last="" polls=0 misses=0 detail
  printf 'Waiting up to %s for %s to become ACTIVE (polling every %s s)\n' "$(elapsed "$WAIT_S")" "$QR_ID" "$POLL_S"
  while :; do
    if state="$(qr_value 'value(state.state)')" && [[ -n "$state" ]]; then
      misses=0
    else
      misses=$((misses + 1))
      ((misses < 5)) || die "cannot read queued resource $QR_ID (5 tries in a row); check: $describe_command"
      state="(not readable yet)"
    fi
    if [[ "$state" != "$last" ]] || ((polls % 10 == 0)); then
      printf '  %9s  %s\n' "$(elapsed $((SECONDS - start)))" "$state"
    fi
    last="$state"
    polls=$((polls + 1))
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED)
        detail="$(qr_value 'value(state.failedData.error.message)' || true)"
        die "queued resource $QR_ID FAILED${detail:+: $detail} (request again: the same command with --replace)"
        ;;
      SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $QR_ID is $state: its TPUs are gone or going (request again: the same command with --replace)"
        ;;
    esac
    if ((SECONDS - start >= WAIT_S)); then
      die "queued resource $QR_ID is still $state after $(elapsed "$WAIT_S"); the request stays queued: rerun this command to keep waiting, watch it with '$describe_command', or withdraw it with tpu_setup/delete.sh $LOCATION_TEXT"
    fi
    sleep "$POLL_S"
  done
}

if [[ "$DIRECT" != 1 ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '(dry run: would now poll the state of %s every %s s, up to %s)\n' "$QR_ID" "$POLL_S" "$(elapsed "$WAIT_S")"
    qr_value 'value(state.state)' || true
  elif ((WAIT_S == 0)); then
    printf '\nQueued. Its state: %s\nRerun this command to wait for it.\n' "$describe_command"
    exit 0
  else
    wait_until_active
    printf '%s is ACTIVE.\n' "$QR_ID"
  fi
fi

if [[ -n "$RUN_COMMAND" ]]; then
  cat <<NEXT

Every worker now installs the code and starts the run by itself (and again at every boot).
Follow worker 0 once the install is done (a few minutes):
  tpu_setup/logs.sh $LOCATION_TEXT
The boot script's own log: tpu_setup/logs.sh $LOCATION_TEXT --log-dir=/var/log --file=mcpo-startup.log
NEXT
elif [[ -n "$CODE_URL" || -n "$REPO_URL" ]]; then
  cat <<NEXT

Every worker now installs the code by itself (a few minutes; install.sh run meanwhile waits for it).
Then launch:
  tpu_setup/launch.sh  $LOCATION_TEXT --config=configs/multi_domain.py ...
NEXT
else
  cat <<NEXT

Next: install the project on every worker, then launch:
  tpu_setup/install.sh $LOCATION_TEXT
  tpu_setup/launch.sh  $LOCATION_TEXT --config=configs/multi_domain.py ...
NEXT
fi
