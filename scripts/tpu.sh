#!/usr/bin/env bash
# Run julian on every worker of a Cloud TPU VM slice (e.g. a v4-32: 4 hosts).
#
#   scripts/tpu.sh TPU_NAME ZONE setup             copy the repo to all workers, install jax[tpu]
#                                                  and requirements.txt
#   scripts/tpu.sh TPU_NAME ZONE COMMAND [ARGS...] copy the repo again (cheap: tracked files only),
#                                                  then run COMMAND on all workers at once, e.g.
#   scripts/tpu.sh my-v4-32 us-central2-b python train.py --flagfile=configs/600m.flags ...
#   scripts/tpu.sh TPU_NAME ZONE ray-start         a Ray cluster over the slice's hosts: the head on
#                                                  worker 0, the others joining it (token auth: the
#                                                  head's token is copied to them)
#   scripts/tpu.sh TPU_NAME ZONE ray-stop          stop it on every host
#   JULIAN_WORKER=0 scripts/tpu.sh TPU_NAME ZONE COMMAND ...   run COMMAND on worker 0 only, e.g.
#     JULIAN_WORKER=0 scripts/tpu.sh my-v4-32 us-central2-b python data.py prepare --ray_address=auto ...
#
# Every host runs the same command; train.py finds the other hosts by itself
# (jax.distributed.initialize() needs no arguments on a TPU slice). After a preemption, recreate
# or restart the slice and run the same line again: training resumes from the newest checkpoint
# in --output_dir (use gs:// so the hosts share it). Output of all workers streams here,
# prefixed by gcloud with the worker's index.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
remote=${JULIAN_REMOTE_DIR:-julian}
gcloud=${GCLOUD:-gcloud}

ssh() {  # ssh WORKER COMMAND
  "$gcloud" compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker="$1" --command="$2"
}

if [[ $1 == ray-start || $1 == ray-stop ]]; then
  ips=$("$gcloud" compute tpus tpu-vm describe "$tpu" --zone="$zone" \
        --format='value(networkEndpoints[].ipAddress)' | tr ';,' '  ')
  read -r -a ips <<< "$ips"
  if [[ $1 == ray-stop ]]; then
    ssh all "ray stop"
    exit
  fi
  ssh 0 "cd $remote && RAY_AUTH_MODE=token ray start --head --port=6379 --node-ip-address=${ips[0]} --disable-usage-stats"
  token=$(ssh 0 "cat ~/.ray/auth_token")
  for ((w = 1; w < ${#ips[@]}; w++)); do
    ssh "$w" "mkdir -p ~/.ray && umask 077 && echo '$token' > ~/.ray/auth_token && cd $remote && \
      RAY_AUTH_MODE=token ray start --address=${ips[0]}:6379 --node-ip-address=${ips[w]} --disable-usage-stats"
  done
  exit
fi

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
ssh "${JULIAN_WORKER:-all}" "$unpack && RAY_AUTH_MODE=token $command"
