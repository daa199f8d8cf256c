#!/usr/bin/env bash
# Run julian on every worker of a Cloud TPU VM slice (e.g. a v4-32: 4 hosts).
#
#   scripts/tpu.sh TPU_NAME ZONE setup             copy the repo to all workers, install jax[tpu]
#                                                  and requirements.txt
#   scripts/tpu.sh TPU_NAME ZONE COMMAND [ARGS...] copy the repo again (cheap: tracked files only),
#                                                  then run COMMAND on all workers at once, e.g.
#   scripts/tpu.sh my-v4-32 us-central2-b python train.py --flagfile=configs/600m.flags ...
#
# Every host runs the same command; train.py finds the other hosts by itself
# (jax.distributed.initialize() needs no arguments on a TPU slice). After a preemption, recreate
# or restart the slice and run the same line again: training resumes from the newest checkpoint
# in --output_dir (use gs:// so the hosts share it). Output of all workers streams here,
# prefixed by gcloud with the worker's index.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
remote=${JULIAN_REMOTE_DIR:-julian}
gcloud=${GCLOUD:-gcloud}

archive=$(mktemp --suffix=.tgz)
trap 'rm -f "$archive"' EXIT
git -C "$repo" ls-files -z | tar -C "$repo" --null -T - -czf "$archive"
"$gcloud" compute tpus tpu-vm scp "$archive" "$tpu:julian.tgz" --zone="$zone" --worker=all
unpack="mkdir -p $remote && tar -xzf julian.tgz -C $remote && cd $remote"

if [[ $1 == setup ]]; then
  command="pip install -U 'jax[tpu]' && pip install -r requirements.txt"
else
  command=$(printf '%q ' "$@")
fi
"$gcloud" compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$unpack && $command"
