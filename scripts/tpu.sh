#!/usr/bin/env bash
# Run julian on every worker of a Cloud TPU VM slice (e.g. a v4-32: 4 hosts).
#
#   scripts/tpu.sh TPU_NAME ZONE setup             copy the repo to all workers, install jax[tpu]
#                                                  and requirements.txt
#   scripts/tpu.sh TPU_NAME ZONE COMMAND [ARGS...] copy the repo again (cheap: tracked files only),
#                                                  then run COMMAND on all workers at once, e.g.
#   scripts/tpu.sh my-v4-32 us-central2-b python train.py --flagfile=configs/600m.flags ...
#   scripts/tpu.sh TPU_NAME ZONE ray-start         a Ray cluster over the slice's hosts: the head on
#                                                  worker 0, the others joining it (token auth, one
#                                                  token on all: $RAY_AUTH_TOKEN, else worker 0's, else
#                                                  a new one; usage stats off)
#   scripts/tpu.sh TPU_NAME ZONE ray-stop          stop the Ray nodes ray-start started (by the pid
#                                                  files it left), and no other Ray on the hosts
#   JULIAN_WORKER=0 scripts/tpu.sh TPU_NAME ZONE COMMAND ...   run COMMAND on worker 0 only, e.g.
#     JULIAN_WORKER=0 scripts/tpu.sh my-v4-32 us-central2-b python data.py prepare --ray_address=auto ...
#
# Every host runs the same command; train.py finds the other hosts by itself
# (jax.distributed.initialize() needs no arguments on a TPU slice). After a preemption, recreate
# or restart the slice and run the same line again: training resumes from the newest checkpoint
# in --output_dir (use gs:// so the hosts share it). Output of all workers streams here,
# prefixed by gcloud with the worker's index.
#
# ray-start/ray-stop settings (environment): JULIAN_SSH, a command run as `$JULIAN_SSH WORKER
# COMMAND` that runs COMMAND on a worker (default: gcloud compute tpus tpu-vm ssh); JULIAN_IPS,
# the workers' addresses, worker 0 first (default: the slice's, from gcloud); JULIAN_RAY_PORT
# (6379); JULIAN_RAY_ARGS, more `ray start` flags for every node (--num-cpus=N, --temp-dir=DIR);
# JULIAN_RAY_HEAD_ARGS, for the head only; JULIAN_RAY_DIR (~/.julian-ray), where each node's pid
# file and log go. Each node runs `ray start --block` in a session of its own: stopping that one
# process stops the node's Ray processes, and nothing else. Ray listens on every interface of the
# hosts (docs/data.md: "A Ray cluster's ports"): keep its ports closed to all but the slice's own network.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
remote=${JULIAN_REMOTE_DIR:-julian}
gcloud=${GCLOUD:-gcloud}

ssh() {  # ssh WORKER COMMAND
  if [[ -n ${JULIAN_SSH:-} ]]; then
    $JULIAN_SSH "$1" "$2"
  else
    "$gcloud" compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker="$1" --command="$2"
  fi
}

if [[ $1 == ray-start || $1 == ray-stop ]]; then
  ips=${JULIAN_IPS:-$("$gcloud" compute tpus tpu-vm describe "$tpu" --zone="$zone" \
        --format='value(networkEndpoints[].ipAddress)')}
  read -r -a ips <<< "${ips//[;,]/ }"
  port=${JULIAN_RAY_PORT:-6379}
  dir=${JULIAN_RAY_DIR:-'~/.julian-ray'}  # expanded on the worker
  if [[ $1 == ray-stop ]]; then
    for ((w = ${#ips[@]} - 1; w >= 0; w--)); do  # the joined nodes first, the head last
      ssh "$w" "pid=\$(cat $dir/node-$w.pid 2>/dev/null) || { echo 'worker $w: no Ray node started by tpu.sh'; exit 0; }
        ps -ww -o args= -p \$pid | grep -q 'ray start --block' || { rm -f $dir/node-$w.pid; echo 'worker $w: its Ray node is gone'; exit 0; }  # -ww: the whole command line, whatever COLUMNS says
        kill -TERM \$pid 2>/dev/null  # ray start --block stops its node's processes on SIGTERM
        for i in \$(seq 600); do kill -0 \$pid 2>/dev/null || break; sleep 0.1; done
        pkill -KILL -s \$pid 2>/dev/null  # what outlived it in its session (setsid: sid = pid)
        rm -f $dir/node-$w.pid; echo 'worker $w: Ray node stopped'"
    done
    exit
  fi
  # `ray start --block` in its own session (setsid: it outlives the ssh session), its pid in a
  # file for ray-stop; ready when it says so in its log, failed if it exits first.
  start_node() {  # start_node WORKER RAY_START_ARGS
    # One simple command in the background (a list would leave a subshell holding ssh's output).
    ssh "$1" "mkdir -p $dir && cd $remote || exit 1
      RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 setsid nohup bash -c 'echo \$\$ > \$0; exec \"\$@\"' $dir/node-$1.pid \
        ray start --block --disable-usage-stats --node-ip-address=${ips[$1]} $2 ${JULIAN_RAY_ARGS:-} \
        > $dir/node-$1.log 2>&1 < /dev/null &
      for i in \$(seq 1200); do
        grep -q 'Ray runtime started' $dir/node-$1.log 2>/dev/null && exit 0
        sleep 0.1; kill -0 \$(cat $dir/node-$1.pid 2>/dev/null) 2>/dev/null || [[ \$i -lt 20 ]] || break
      done
      echo 'worker $1: ray start failed:'; tail -n 20 $dir/node-$1.log; exit 1"
  }
  # Token authentication needs the same token on every node, and `ray start` makes none (a fresh
  # slice has none): $RAY_AUTH_TOKEN if set here, else worker 0's ~/.ray/auth_token, else a new
  # one Ray generates there. Every worker gets it in ~/.ray/auth_token (where its nodes and the
  # drivers COMMAND runs look), through ssh's input, not a command line others could read;
  # written only when it differs, and atomically: other Ray users of the host read it too.
  token=${RAY_AUTH_TOKEN:-$(ssh 0 "umask 077 && ray get-auth-token --generate 2>/dev/null")}
  [[ -n $token ]] || { echo "worker 0: no Ray token (ray get-auth-token --generate failed)" >&2; exit 1; }
  for ((w = 0; w < ${#ips[@]}; w++)); do
    printf '%s' "$token" | ssh "$w" "mkdir -p ~/.ray && umask 077 && token=\$(cat) &&
      if [[ \$(cat ~/.ray/auth_token 2>/dev/null) != \"\$token\" ]]; then
        printf '%s' \"\$token\" > ~/.ray/auth_token.tmp && mv ~/.ray/auth_token.tmp ~/.ray/auth_token; fi"
  done
  start_node 0 "--head --port=$port ${JULIAN_RAY_HEAD_ARGS:-}"
  for ((w = 1; w < ${#ips[@]}; w++)); do
    start_node "$w" "--address=${ips[0]}:$port"
  done
  echo "Ray cluster: head ${ips[0]}:$port, ${#ips[@]} nodes (scripts/tpu.sh ... ray-stop stops them)"
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
# A driver of the cluster ray-start started must expect its token authentication too.
ssh "${JULIAN_WORKER:-all}" "$unpack && RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 $command"
