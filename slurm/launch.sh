#!/usr/bin/env bash
# slurm/launch.sh CONFIG [TRAINER ARGS...]
#
# The body of every batch script in slurm/: slurm/pretrain.sh and slurm/pretrain_*.sh `exec` it inside the
# allocation, so this shell *is* the batch shell that Slurm's `--signal=B:USR1@300` reaches. It
#   1. runs ONE srun task per node, each a torchrun with a static rendezvous (master = the first node of the
#      allocation, node rank = SLURM_NODEID) starting NPROC trainer processes,
#   2. on SIGUSR1 (preemption, or 300 s before the time limit) asks the trainer to checkpoint and stop, then
#      requeues the job (`scontrol requeue`); the requeued job resumes from <checkpoint dir>/latest by itself.
#   3. when the training step fails (a node lost, a process killed: srun --kill-on-bad-exit ends the other
#      nodes' processes at once) after a newer checkpoint than the one this run started from, requeues it too;
#      a failure with no new checkpoint (a bug or bad input that would only repeat) ends the job with its code.
#
# Environment (all optional; the submitting shell's environment reaches the job: sbatch exports it):
#   QSPARSE_REPO              repository root (default: SLURM_SUBMIT_DIR, so submit from the repository root)
#   QSPARSE_PYTHON            interpreter (default: $QSPARSE_REPO/.venv/bin/python)
#   QSPARSE_NPROC_PER_NODE    trainer processes per node (default: the node's GPUs, from SLURM_GPUS_ON_NODE or
#                             nvidia-smi; 1 without GPUs). Set it on CPU nodes: gloo is used when there is no CUDA.
#   QSPARSE_RUN_DIR           becomes --set log.run_dir=...
#   QSPARSE_CHECKPOINT_DIR    becomes --set checkpoint.dir=...
#   QSPARSE_SET               more overrides: whitespace-separated key=value pairs, each becomes --set key=value
#                             (values cannot contain spaces; pass such ones as trainer arguments instead)
#   QSPARSE_MASTER_ADDR       rendezvous host (default: first host of `scontrol show hostnames $SLURM_JOB_NODELIST`)
#   QSPARSE_MASTER_PORT       rendezvous port (default: 20000 + (job id + 1000 × restart count) mod 20000)
#   QSPARSE_SHUTDOWN_TIMEOUT  seconds torchrun lets the workers checkpoint after a signal before SIGKILL (default
#                             240: keep it below the --signal lead time, 300 s in the batch scripts)
#   QSPARSE_MAX_RESTARTS      stop requeueing after this many restarts (default 50)
#   QSPARSE_REQUEUE_ON_FAILURE  1 (default): requeue a failed run that checkpointed progress (3. above); 0: never
# Overrides apply in this order (the last wins): the config file, QSPARSE_RUN_DIR, QSPARSE_CHECKPOINT_DIR,
# QSPARSE_SET, then the TRAINER ARGS given to the batch script.
#
# Example, the 7B script on two CPU nodes with the tiny model (what tests/e2e/test_slurm.py submits):
#   QSPARSE_NPROC_PER_NODE=2 QSPARSE_RUN_DIR=/tmp/run \
#   QSPARSE_SET="model.preset=tiny model.num_layers=2 model.hidden_size=64 ... parallel.tp=2 parallel.pp=2" \
#   sbatch --nodes=2 slurm/pretrain_7b.sh

set -uo pipefail  # no -e: exit statuses of the training step are inspected below

say() { echo "[launch $(date +%H:%M:%S)] $*"; }

# ---- SIGUSR1 first: unhandled, it would end this shell ---------------------------------------------------------
PREEMPTED=0
SRUN_PID=""
# shellcheck disable=SC2317  # a trap handler
on_usr1() {
    PREEMPTED=1
    if [[ -n "$SRUN_PID" ]]; then
        say "SIGUSR1: asking the trainer to checkpoint and stop (forwarded to srun $SRUN_PID)"
        kill -USR1 "$SRUN_PID" 2>/dev/null || true
    fi
}
trap on_usr1 USR1

if (($# < 1)); then
    echo "usage: $0 CONFIG [TRAINER ARGS...]   (inside a Slurm allocation, via sbatch slurm/pretrain*.sh)" >&2
    exit 2
fi
CONFIG="$1"
shift
# The sized batch scripts pass their default config first; a .yaml the user gave them replaces it.
if [[ "${1:-}" == *.yaml || "${1:-}" == *.yml ]]; then
    CONFIG="$1"
    shift
fi
if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "$0: not inside a Slurm job; submit with sbatch (see slurm/README.md for torchrun without Slurm)" >&2
    exit 2
fi

REPO="${QSPARSE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO" || exit 2
PYTHON="${QSPARSE_PYTHON:-$REPO/.venv/bin/python}"
TRAIN_SCRIPT="pretrain_scripts/pretrain_qsparse.py"
if [[ ! -x "$PYTHON" || ! -f "$TRAIN_SCRIPT" ]]; then
    echo "$0: $REPO has no $TRAIN_SCRIPT or no interpreter $PYTHON: submit from the repository root after" \
        "'make install', or set QSPARSE_REPO / QSPARSE_PYTHON" >&2
    exit 2
fi

# ---- layout --------------------------------------------------------------------------------------------------
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
MASTER_ADDR="${QSPARSE_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
MASTER_PORT="${QSPARSE_MASTER_PORT:-$((20000 + (SLURM_JOB_ID + 1000 * RESTARTS) % 20000))}"
GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
NPROC="${QSPARSE_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$GPUS}}"
[[ -z "${QSPARSE_NPROC_PER_NODE:-}" && "$NPROC" == 0 ]] && NPROC=1
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ && "$NNODES" =~ ^[1-9][0-9]*$ && -n "$MASTER_ADDR" ]]; then
    echo "$0: bad layout: $NNODES node(s) x '$NPROC' process(es), master '$MASTER_ADDR'" >&2
    exit 2
fi

# NCCL on GPU nodes (the trainer picks NCCL when CUDA is there, gloo otherwise).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"  # the name before torch 2.2
if ((GPUS == 0)); then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # DeepSpeed: no CUDA here
fi
export PYTHONUNBUFFERED=1

# ---- trainer arguments -----------------------------------------------------------------------------------------
ARGS=(--config "$CONFIG")
[[ -n "${QSPARSE_RUN_DIR:-}" ]] && ARGS+=(--set "log.run_dir=$QSPARSE_RUN_DIR")
[[ -n "${QSPARSE_CHECKPOINT_DIR:-}" ]] && ARGS+=(--set "checkpoint.dir=$QSPARSE_CHECKPOINT_DIR")
EXTRA=()
read -r -d '' -a EXTRA <<<"${QSPARSE_SET:-}" || true
for kv in "${EXTRA[@]}"; do
    ARGS+=(--set "$kv")
done
ARGS+=("$@")

say "job $SLURM_JOB_ID (restart $RESTARTS) on $NNODES node(s) [$SLURM_JOB_NODELIST] x $NPROC process(es);" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; $PYTHON $TRAIN_SCRIPT ${ARGS[*]}"

requeue() {  # requeue this job (it resumes from the latest checkpoint), then end this run
    if ((RESTARTS >= ${QSPARSE_MAX_RESTARTS:-50})); then
        say "not requeueing: $RESTARTS restarts already (QSPARSE_MAX_RESTARTS); resubmit to continue"
        exit 75
    fi
    say "requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    say "scontrol requeue failed; resubmit the same command to resume"
    exit 75
}

progress() {  # "STEP STEPS": the newest complete checkpoint's step (-1: none) and the run's train.steps
    "$PYTHON" - "${ARGS[@]}" <<'EOF' 2>/dev/null
import argparse, sys

from megatron_qsparse.model.checkpoint import find_latest, read_trainer_state
from megatron_qsparse.training.config import load_config

parser = argparse.ArgumentParser()
parser.add_argument("--config")
parser.add_argument("--set", dest="overrides", action="append", default=[])
args, _ = parser.parse_known_args(sys.argv[1:])
cfg = load_config(args.config, args.overrides)

latest = find_latest(cfg.checkpoint_dir, verify=False)  # sizes and structure: the trainer verifies on resume
print(read_trainer_state(latest)["step"] if latest else -1, cfg.train.steps)
EOF
}

((PREEMPTED)) && requeue  # the signal came before training started: nothing to save

# ---- 0. the config, checked once for the whole job: one line, instead of an error from every worker -----------
if ! WORLD_SIZE=$((NNODES * NPROC)) "$PYTHON" "$TRAIN_SCRIPT" --check "${ARGS[@]}" >/dev/null; then
    say "configuration error (above): fix it and resubmit"
    exit 2
fi

read -r START_STEP _ < <(progress || echo "-1 unknown")  # what a failed run must have gone past to be requeued

# ---- 1. one torchrun per node ----------------------------------------------------------------------------------
# torchrun handles SIGUSR1 only when told (--signals-to-handle); it then sends it on to every worker and waits
# --shutdown-timeout for them (the trainer checkpoints and exits 75). Unhandled, SIGUSR1 kills torchrun at once.
# shellcheck disable=SC2054  # the commas belong to one argument
TORCHRUN=(--nnodes="$NNODES" --nproc-per-node="$NPROC"
    --rdzv-backend=static --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    --shutdown-timeout="${QSPARSE_SHUTDOWN_TIMEOUT:-240}")
# The node rank is SLURM_NODEID of each task: expanded by the task's shell, which then becomes torchrun (exec),
# so srun's signal forwarding reaches torchrun itself.
# shellcheck disable=SC2016  # $SLURM_NODEID and $0 are for the task's shell
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    --kill-on-bad-exit=1 \
    bash -c 'exec "$0" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"' \
    "$PYTHON" "${TORCHRUN[@]}" "$TRAIN_SCRIPT" "${ARGS[@]}" &
SRUN_PID=$!
rc=0
for ((i = 0; i < 1000; i++)); do  # `wait` returns early for each trapped signal
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

# ---- 2. done, preempted or failed --------------------------------------------------------------------------------
if ((rc == 0)); then
    say "training finished"
    exit 0
fi
if ((PREEMPTED)); then
    # torchrun exits 1 after a signal whatever its workers did (their exit 75 is not passed on), so the
    # checkpoint tells whether the run still has steps to go.
    read -r step steps < <(progress || echo "-1 unknown")
    if [[ "$steps" =~ ^[0-9]+$ ]] && ((step >= steps)); then
        say "training finished (checkpoint of step $step of $steps) before the signal took effect"
        exit 0
    fi
    say "stopped; newest checkpoint: step $step of $steps (training step exit $rc)"
    requeue
fi
read -r step steps < <(progress || echo "-1 unknown")
if [[ "$step" =~ ^[0-9]+$ ]] && ((step > START_STEP)) && ((${QSPARSE_REQUEUE_ON_FAILURE:-1})); then
    say "training step failed (exit $rc) after checkpointing step $step of $steps (this run started from" \
        "step $START_STEP)"
    requeue
fi
say "training step failed (exit $rc); not requeueing: no checkpoint newer than step $START_STEP was written" \
    "by this run, so the failure would repeat"
exit "$rc"
