#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for the CI smoke test (tests/e2e/test_slurm.py) and for trying
# the batch scripts without a real cluster. Run as root (Debian 12: Slurm 22.05, munge 0.5).
#
#   slurm/local_cluster.sh up               install munge/slurm if missing, start munged, slurmctld and two slurmd
#                                           (node1, node2), then print the line to paste: export SLURM_CONF=...
#   slurm/local_cluster.sh status           daemons, nodes and jobs
#   slurm/local_cluster.sh wait JOBID [TIMEOUT]
#                                           poll the job every 0.2 s until it ends (default 600 s); prints its final
#                                           state; exit 0 only when it COMPLETED (124 when the time ran out)
#   slurm/local_cluster.sh down             cancel remaining jobs, stop what `up` started, restore /etc/hosts
#
# Environment: QSPARSE_SLURM_DIR (state directory, default /tmp/qsparse-slurm), QSPARSE_SLURM_PORT (first of three
# ports: slurmctld, then slurmd of node1 and node2; default: the first free triple from 17000),
# QSPARSE_SLURM_GPUS (GPUs each node claims, default 8; they are counters only, so the GPU-shaped
# #SBATCH headers of slurm/pretrain_*.sh are accepted unchanged on CPU nodes).
#
# Everything listens on 127.0.0.1 only. Every Slurm client command here runs with SLURM_CONF pointing at this
# cluster's slurm.conf: without a slurm.conf, Slurm clients look their controller up in DNS (SRV records),
# which sends traffic off the machine. Nothing is exported into your shell: run the printed `export` line.
# Exit codes: 0 ok, 1 failure, 3 the packages could not be installed (the smoke test skips then).

set -euo pipefail

STATE="${QSPARSE_SLURM_DIR:-/tmp/qsparse-slurm}"
CONF="$STATE/etc/slurm.conf"
GPUS="${QSPARSE_SLURM_GPUS:-8}"
HOSTS_MARK="# qsparse-local-cluster"
NODES=(node1 node2)
PACKAGES=(munge slurm-client slurmctld slurmd)

log() { echo "local_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# ---- helpers -----------------------------------------------------------------------------------------------
port_free() {  # nothing listening on 127.0.0.1:$1
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pid_alive() {  # the pid in file $1 runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

client() {  # a Slurm client command, only ever against this cluster's slurm.conf
    [[ -f "$CONF" ]] || die "no $CONF: run '$0 up' first"
    SLURM_CONF="$CONF" timeout 20 "$@"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    ((${#missing[@]} == 0)) && return 0
    [[ $EUID -eq 0 ]] || { log "missing ${missing[*]}: installing needs root"; exit 3; }
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$STATE/log/apt.log" 2>&1; then
        log "apt-get install failed; running apt-get update first"
        if ! { timeout 600 apt-get update &&
            timeout 600 apt-get install -y --no-install-recommends "${PACKAGES[@]}"; } \
            >>"$STATE/log/apt.log" 2>&1; then
            tail -n 20 "$STATE/log/apt.log" >&2
            log "could not install ${PACKAGES[*]} (log: $STATE/log/apt.log)"
            exit 3
        fi
    fi
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    if timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
        log "munged already running (left alone)"
        return 0
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    local i
    for ((i = 0; i < 50; i++)); do
        if [[ -s /run/munge/munged.pid ]] && timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$STATE/run/munged.pid"  # ours: `down` stops it
            return 0
        fi
        sleep 0.1
    done
    die "munged did not start"
}

choose_ports() {
    local base
    for base in ${QSPARSE_SLURM_PORT:-17000 17100 17200 17300 17400 17500 17600 17700 17800 17900}; do
        if port_free "$base" && port_free $((base + 1)) && port_free $((base + 2)); then
            echo "$base"
            return 0
        fi
    done
    die "no free port triple found (set QSPARSE_SLURM_PORT)"
}

write_config() {
    local base="$1" cpus first_job=1
    cpus="$(nproc)"
    [[ -s "$STATE/next_job_id" ]] && first_job="$(cat "$STATE/next_job_id")"
    [[ "$first_job" =~ ^[0-9]+$ ]] || first_job=1
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: two slurmd daemons (node1, node2) on this machine, loopback only.
ClusterName=qsparse-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$base
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule at once (default: batch jobs wait, and a requeued job waits for the next 30-60 s scheduler pass).
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
# Refuse an impossible job at submission instead of queueing it forever.
EnforcePartLimits=ALL
# Nodes are what this file says (CPUs, GPUs), not what the hardware has.
SlurmdParameters=config_overrides
JobRequeue=1
# Job ids go on from the last session (slurmctld starts with -c, without old jobs): with --open-mode=append a
# reused id would append to an earlier job's output file.
FirstJobId=$first_job
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
PartitionName=local Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    local node="NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 1))-$((base + 2))"
    node+=" CPUs=$cpus State=UNKNOWN"
    rm -f "$STATE/etc/gres.conf"
    if ((GPUS > 0)); then
        # Stand-in GPUs, so that the GPU-shaped #SBATCH headers are accepted on CPU nodes. slurmd drops a GPU
        # without a device file ("Removing file-less GPU") and refuses a file that is not a device: each gets a
        # character device that is a copy of /dev/null (root-only). Nothing opens them; jobs see
        # CUDA_VISIBLE_DEVICES and SLURM_GPUS_ON_NODE, nothing else.
        local i
        mkdir -p "$STATE/dev"
        for ((i = 0; i < GPUS; i++)); do
            [[ -e "$STATE/dev/gpu$i" ]] || mknod -m 600 "$STATE/dev/gpu$i" c 1 3 || : >"$STATE/dev/gpu$i"
        done
        echo "NodeName=node[1-2] Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]" >"$STATE/etc/gres.conf"
        echo "GresTypes=gpu" >>"$CONF"
        node+=" Gres=gpu:$GPUS"
    fi
    echo "$node" >>"$CONF"
}

hosts_add() {  # node names resolve to the loopback while the cluster is up
    grep -q "$HOSTS_MARK" /etc/hosts && return 0  # another state directory's cluster added them
    cp /etc/hosts "$STATE/run/hosts.orig"
    echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >>/etc/hosts
    touch "$STATE/run/hosts.added"
}

hosts_restore() {
    [[ -f "$STATE/run/hosts.added" ]] || return 0
    rm -f "$STATE/run/hosts.added"
    grep -q "$HOSTS_MARK" /etc/hosts || return 0
    local kept
    kept="$(grep -v "$HOSTS_MARK" /etc/hosts)"
    # Rewrite in place (no rename): /etc/hosts is often a bind mount in containers.
    printf '%s\n' "$kept" >/etc/hosts
}

stop_pidfiles() {  # SIGTERM the pids in the files given (our daemons wrote them), SIGKILL after 10 s
    local file pid pids=() i
    for file in "$@"; do
        if [[ -s "$file" ]]; then
            pid="$(cat "$file")"
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        fi
        rm -f "$file"
    done
    for ((i = 0; i < 100 && ${#pids[@]} > 0; i++)); do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && break
            pids=("${pids[@]:1}")
        done
        ((${#pids[@]} > 0)) && sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
}

job_field() {  # job_field JOBID FIELD: one field of `scontrol show job -o`
    { client scontrol show job -o "$1" 2>/dev/null || true; } | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1
}

# ---- commands ----------------------------------------------------------------------------------------------
cmd_up() {
    [[ $EUID -eq 0 ]] || { log "must run as root"; exit 3; }
    if pid_alive "$STATE/run/slurmctld.pid"; then
        log "already up"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$STATE"/{etc,ctld,log,run} "$STATE/spool/node1" "$STATE/spool/node2"
    rm -f "$STATE"/log/*.log  # this session's logs only
    install_packages
    start_munge
    write_config "$(choose_ports)"
    hosts_add
    export SLURM_CONF="$CONF"
    slurmctld -c -f "$CONF"  # -c: start without the jobs of an earlier session
    local node
    for node in "${NODES[@]}"; do
        slurmd -N "$node" -f "$CONF"
    done
    local i state
    for ((i = 0; i < 150; i++)); do  # 30 s
        state="$(client sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
        [[ "$state" == "idle " ]] && break
        sleep 0.2
    done
    if [[ "$state" != "idle " ]]; then
        tail -n 20 "$STATE"/log/*.log >&2 || true
        die "nodes not idle after 30 s (state: ${state:-none}); logs in $STATE/log"
    fi
    log "up: nodes ${NODES[*]} idle; state in $STATE"
    echo "export SLURM_CONF=$CONF"
}

cmd_down() {
    if [[ -f "$CONF" ]] && pid_alive "$STATE/run/slurmctld.pid"; then
        # Jobs first: their processes (slurmstepd and below) outlive slurmd.
        local jobs i
        jobs="$(client squeue -h -o '%i' 2>/dev/null | tr '\n' ' ' || true)"
        if [[ -n "${jobs// /}" ]]; then
            log "cancelling jobs $jobs"
            # shellcheck disable=SC2086  # one job id per word
            client scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 150; i++)); do  # 30 s
                [[ -z "$(client squeue -h -o '%i' 2>/dev/null || echo failed)" ]] && break
                sleep 0.2
            done
        fi
    fi
    if [[ -f "$CONF" ]] && pid_alive "$STATE/run/slurmctld.pid"; then
        { client scontrol show config 2>/dev/null || true; } | sed -n 's/^NEXT_JOB_ID *= *//p' >"$STATE/next_job_id"
    fi
    stop_pidfiles "$STATE"/run/slurmd-node{1,2}.pid "$STATE/run/slurmctld.pid"
    stop_pidfiles "$STATE/run/munged.pid"  # last: the others talk to it while stopping
    hosts_restore
    log "down (logs kept in $STATE/log)"
}

cmd_status() {
    local name
    for name in slurmctld slurmd-node1 slurmd-node2 munged; do
        if pid_alive "$STATE/run/$name.pid"; then
            echo "$name: running (pid $(cat "$STATE/run/$name.pid"))"
        else
            echo "$name: not running (not started by this script)"
        fi
    done
    if [[ -f "$CONF" ]] && pid_alive "$STATE/run/slurmctld.pid"; then
        echo "export SLURM_CONF=$CONF"
        client sinfo -N || true
        client squeue || true
    fi
}

cmd_wait() {
    local job="${1:?usage: $0 wait JOBID [TIMEOUT_S]}" timeout="${2:-600}" state="" i n unknown=0
    [[ "$job" =~ ^[0-9]+$ ]] || die "not a job id: $job"
    [[ "$timeout" =~ ^[0-9]+$ ]] || die "not a number of seconds: $timeout"
    n=$((timeout * 5))
    for ((i = 0; i < n; i++)); do
        state="$(job_field "$job" JobState)"
        case "$state" in
            COMPLETED)
                echo "$state"
                return 0
                ;;
            FAILED | CANCELLED | TIMEOUT | NODE_FAIL | PREEMPTED | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE)
                echo "$state"
                return 1
                ;;
            "")  # not known (any more), or the controller did not answer: give it 5 s
                unknown=$((unknown + 1))
                if ((unknown >= 25)); then
                    echo UNKNOWN
                    return 1
                fi
                ;;
            *) unknown=0 ;;
        esac
        sleep 0.2
    done
    echo "$state (still, after ${timeout} s)"
    return 124
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    wait)
        shift
        cmd_wait "$@"
        ;;
    *)
        echo "usage: $0 up|down|status|wait JOBID [TIMEOUT_S]" >&2
        exit 1
        ;;
esac
