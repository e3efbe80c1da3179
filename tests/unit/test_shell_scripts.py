"""The Slurm scripts: `bash -n` always, shellcheck when it is installed (installed here with apt when running as
root), the batch headers, and the launcher's command line checked with stand-ins for srun/scontrol (no Slurm is
contacted: the stand-ins come first on PATH and SLURM_CONF names a file that does not exist)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
WRAPPERS = {
    "pretrain_300m.sh": "300m.yaml",
    "pretrain_700m.sh": "700m.yaml",
    "pretrain_1p3b.sh": "1.3b.yaml",
    "pretrain_7b.sh": "7b.yaml",
}
HEADER = [
    "--ntasks-per-node=1",
    "--gpus-per-node=8",
    "--exclusive",
    "--output=runs/slurm/%x-%j.out",
    "--signal=B:USR1@300",
    "--requeue",
    "--open-mode=append",
]


def test_the_scripts_are_there():
    names = {p.name for p in SCRIPTS}
    assert {"pretrain.sh", "launch.sh", "local_cluster.sh", *WRAPPERS} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def shellcheck():
    if shutil.which("shellcheck") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "shellcheck"],
            capture_output=True,
            timeout=600,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
    path = shutil.which("shellcheck")
    if path is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    return path


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(shellcheck, script):
    proc = subprocess.run([shellcheck, "--severity=info", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(WRAPPERS) + ["pretrain.sh"])
def test_batch_headers(name):
    text = (SLURM / name).read_text()
    options = [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith("#SBATCH")]
    for option in HEADER:
        assert option in options, f"{name}: missing #SBATCH {option}"
    assert any(o.startswith("--nodes=") for o in options) and any(o.startswith("--time=") for o in options)
    assert 'exec bash "$REPO/slurm/launch.sh"' in text  # exec: the launcher is the shell Slurm signals
    if name in WRAPPERS:
        assert f'launch.sh" pretrain_scripts/configs/{WRAPPERS[name]} "$@"' in text
        assert (REPO / "pretrain_scripts" / "configs" / WRAPPERS[name]).is_file()


def test_launcher_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(SLURM / "launch.sh"), "pretrain_scripts/configs/7b.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr


def stand_ins(tmp_path, tools: dict, **slurm) -> dict:
    """Executable stand-ins (name -> bash body) first on PATH, each able to append to $RECORD; the environment of
    a job without the caller's SLURM_/QSPARSE_ variables, plus ``slurm``. No Slurm is contacted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "QSPARSE_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        RECORD=str(tmp_path / "record"),
        SLURM_CONF=str(tmp_path / "no-slurm.conf"),
        SLURM_SUBMIT_DIR=str(REPO),
        QSPARSE_PYTHON=str(bin_dir / "python"),
        **slurm,
    )
    return env


def test_launcher_runs_one_torchrun_per_node_with_a_static_rendezvous(tmp_path):
    """srun and scontrol are stand-ins: srun runs each per-node command line as node 0 and node 1 would, with the
    interpreter replaced by one that records its arguments."""
    record = tmp_path / "record"
    tools = {
        "scontrol": 'echo "scontrol $*" >> "$RECORD"\n'
        '[[ "$1 $2" == "show hostnames" ]] && printf "gpu17\\ngpu18\\n"\nexit 0\n',
        "srun": 'echo "srun $*" >> "$RECORD"\n'
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for n in 0 1; do SLURM_NODEID=$n "$@" || exit $?; done\n',
        "python": 'echo "python $*" >> "$RECORD"\n',
    }
    env = stand_ins(
        tmp_path,
        tools,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[17-18]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_CPUS_ON_NODE="64",
        SLURM_GPUS_ON_NODE="8",
        QSPARSE_RUN_DIR="/scratch/run",
        QSPARSE_SET="model.preset=tiny  train.steps=20\nparallel.tp=2",
    )
    proc = subprocess.run(
        ["bash", str(SLURM / "pretrain_7b.sh"), "--set", "log.interval=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = record.read_text().splitlines()
    assert lines[0] == "scontrol show hostnames gpu[17-18]"
    trainer = (
        "pretrain_scripts/pretrain_qsparse.py --config pretrain_scripts/configs/7b.yaml "
        "--set log.run_dir=/scratch/run --set model.preset=tiny --set train.steps=20 --set parallel.tp=2 "
        "--set log.interval=1"
    )
    assert lines[1] == "python " + trainer.replace(" --config", " --check --config", 1)  # validated once, first
    # the newest checkpoint's step at the start (a failed run must pass it to be requeued)
    assert lines[2] == "python - " + trainer.split(" ", 1)[1]
    srun = lines[3]
    assert srun.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1")
    for node, line in enumerate(lines[4:6]):
        assert line.startswith(
            f"python -m torch.distributed.run --node-rank={node} --nnodes=2 --nproc-per-node=8 "
            "--rdzv-backend=static --master-addr=gpu17 --master-port=24242 --max-restarts=0 "
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=240 "
        ), line
        assert line.endswith(trainer), line
    assert len(lines) == 6
    assert "training finished" in proc.stdout


@pytest.mark.parametrize(
    "steps_before,steps_after,requeued",
    [("-1 20", "5 20", True), ("5 20", "10 20", True), ("5 20", "5 20", False), ("-1 20", "-1 20", False)],
)
def test_a_failed_step_requeues_only_after_checkpointing_progress(tmp_path, steps_before, steps_after, requeued):
    """A node lost mid-run (srun fails): requeued when the newest checkpoint moved past the one the run started
    from; a failure without progress (it would only repeat) ends the job with the step's exit code."""
    record, probes = tmp_path / "record", tmp_path / "probes"
    probes.write_text("")
    tools = {
        "scontrol": 'printf "n1\\nn2\\n"\n[[ "$1" == requeue ]] && echo "scontrol $*" >> "$RECORD"\nexit 0\n',
        "srun": "exit 1\n",
        # the --check run, then the two progress probes (before the step, after its failure)
        "python": (
            f'[[ "$1" == - ]] || exit 0\nn=$(wc -l < {probes}); echo >> {probes}\n'
            f'if ((n == 0)); then echo "{steps_before}"; else echo "{steps_after}"; fi\n'
        ),
    }
    env = stand_ins(tmp_path, tools, SLURM_JOB_ID="77", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES="2")
    proc = subprocess.run(
        ["bash", str(SLURM / "pretrain_7b.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    requeues = record.read_text().splitlines() if record.exists() else []
    if requeued:
        assert proc.returncode == 0 and requeues == ["scontrol requeue 77"], proc.stdout + proc.stderr
        assert f"after checkpointing step {steps_after.split()[0]} of 20" in proc.stdout
    else:
        assert proc.returncode == 1 and requeues == [], proc.stdout + proc.stderr
        assert "not requeueing: no checkpoint newer than step" in proc.stdout


def test_launcher_stops_on_a_config_error_before_starting_any_worker(tmp_path):
    record = tmp_path / "record"
    tools = {
        "scontrol": 'printf "n1\\n"\n',
        "srun": 'echo "srun $*" >> "$RECORD"\n',
        "python": 'echo "python $*" >> "$RECORD"\necho "error: x.yaml: train.steps: must be >= 1" >&2\nexit 2\n',
    }
    env = stand_ins(tmp_path, tools, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="1")
    proc = subprocess.run(
        ["bash", str(SLURM / "pretrain.sh"), "--set", "train.steps=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "error: x.yaml: train.steps: must be >= 1"
    assert [line.split()[2] for line in record.read_text().splitlines()] == ["--check"]  # no srun


@pytest.mark.parametrize("exit_code,requeued", [(0, False), (75, True)])
def test_sweep_array_task_runs_its_grid_point_and_requeues_when_stopped(tmp_path, exit_code, requeued):
    record = tmp_path / "record"
    tools = {
        "scontrol": 'echo "scontrol $*" >> "$RECORD"\n',
        "python": f'echo "python $*" >> "$RECORD"\nexit {exit_code}\n',
    }
    env = stand_ins(tmp_path, tools, SLURM_JOB_ID="901", SLURM_ARRAY_JOB_ID="900", SLURM_ARRAY_TASK_ID="3")
    proc = subprocess.run(
        ["bash", str(SLURM / "sweep.sh"), "sweeps/scaling.yaml", "--jobs", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == exit_code, proc.stdout + proc.stderr
    lines = record.read_text().splitlines()
    assert lines[0] == f"python {REPO}/tools/sweep.py sweeps/scaling.yaml --jobs 1 --index 3"
    assert (lines[1:] == ["scontrol requeue 900_3"]) == requeued and len(lines) == 1 + requeued
