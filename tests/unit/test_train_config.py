"""Every configuration error is reported before any process group starts, naming the key and the fix."""

import subprocess
import sys

import pytest

from megatron_qsparse.training.config import ConfigError, build_config, load_config
from megatron_qsparse.training.schedules import lr_and_weight_decay, sparsity_scale

REPO_CONFIGS = "pretrain_scripts/configs"


def config(tmp_path, **sections):
    tok = tmp_path / "tok"
    tok.mkdir(exist_ok=True)
    for name in ("train", "valid"):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes(b"")
    data = {
        "model": {"preset": "tiny"},
        "data": {"tokenizer": str(tok), "train": [str(tmp_path / "train")], "valid": [str(tmp_path / "valid")]},
        "log": {"run_dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["model.sparsity.qkv=1.2"], 1, r"sparsity.qkv=1.2 must lie in \[0, 1\)"),
        (["model.sparsity.default=-0.1"], 1, r"must lie in \[0, 1\)"),
        (["parallel.tp=3"], 3, "num_attention_heads=4 is not divisible by tensor_model_parallel_size"),
        (["parallel.tp=2"], 3, "world size 3 is not divisible by tp×pp = 2×1"),
        (
            ["parallel.tp=2", "model.sparsity.default=0.5", "model.sparsity.block_size=48"],
            2,
            "block_size=48 does not divide the proj input shard",
        ),
        (["batch.global_batch_size=10"], 4, "not a multiple of micro_batch_size × data-parallel size"),
        (["parallel.pp=2", "optimizer.zero_stage=2"], 2, "2 is not supported with pipeline parallelism"),
        (["parallel.pp=2"], 2, "tied embeddings are not supported with pipeline parallelism"),
        (["train.mode=continue"], 1, "set train.init_from"),
        (["schedule.kind=linear"], 1, "is not one of cosine, polynomial, two_stage"),
        (["parallel.ep=2"], 2, "expert parallelism needs experts"),
        (["model.num_experts=3", "parallel.ep=2"], 2, r"must divide model.num_experts \(3\)"),
    ],
)
def test_config_errors_name_the_key(tmp_path, overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        build_config(config(tmp_path), overrides, source="test.yaml").validate(world)


def test_missing_data_and_unknown_keys(tmp_path):
    data = config(tmp_path)
    data["data"]["train"] = [str(tmp_path / "absent")]
    with pytest.raises(ConfigError, match=r"absent.bin does not exist"):
        build_config(data).validate(1)
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        build_config(config(tmp_path, train={"stepz": 3}))
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        build_config(config(tmp_path), ["train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown section"):
        build_config({"trian": {}})


def test_cli_reports_config_error_with_exit_2_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "pretrain_scripts/pretrain_qsparse.py",
            "--config",
            f"{REPO_CONFIGS}/tiny-cpu.yaml",
            "--set",
            "model.sparsity.fc2=1.5",
            "--set",
            f"log.run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "sparsity.fc2=1.5" in proc.stderr
    assert not run_dir.exists()


def test_shipped_configs_load():
    import glob

    names = sorted(glob.glob(f"{REPO_CONFIGS}/*.yaml"))
    assert {
        "tiny-cpu.yaml",
        "300m.yaml",
        "700m.yaml",
        "1.3b.yaml",
        "7b.yaml",
        "7b-bitnet.yaml",
        "tiny-cpu-moe.yaml",
    } <= {n.split("/")[-1] for n in names}
    seven = load_config(f"{REPO_CONFIGS}/7b.yaml")
    assert (seven.model.hidden_size, seven.model.ffn_hidden_size, seven.optimizer.lr) == (4096, 11008, 1.5e-4)
    assert seven.batch.global_batch_size * seven.model.seq_length == 524288  # 0.5M tokens per step
    bitnet = load_config(f"{REPO_CONFIGS}/7b-bitnet.yaml")
    assert bitnet.model.bitnet and bitnet.schedule.kind == "two_stage"


def test_schedules():
    c = build_config(
        {
            "optimizer": {"lr": 1.0, "min_lr": 0.1, "weight_decay": 0.1},
            "schedule": {"kind": "cosine", "warmup_steps": 10},
        }
    )
    assert lr_and_weight_decay(0, 110, c.optimizer, c.schedule)[0] == pytest.approx(0.1)
    assert lr_and_weight_decay(9, 110, c.optimizer, c.schedule)[0] == pytest.approx(1.0)
    assert lr_and_weight_decay(60, 110, c.optimizer, c.schedule)[0] == pytest.approx(0.55)
    assert lr_and_weight_decay(110, 110, c.optimizer, c.schedule)[0] == pytest.approx(0.1)
    p = build_config({"optimizer": {"lr": 5e-5, "min_lr": 1e-6}, "schedule": {"kind": "polynomial", "power": 1.0}})
    assert lr_and_weight_decay(50, 100, p.optimizer, p.schedule)[0] == pytest.approx((5e-5 + 1e-6) / 2)
    # BitNet two-stage: LR restarts lower and weight decay drops to 0 at the boundary.
    t = build_config(
        {
            "optimizer": {"lr": 1e-3, "min_lr": 1e-5, "weight_decay": 0.1},
            "schedule": {"kind": "two_stage", "stage2_at": 0.5, "stage2_lr": 6e-4},
        }
    )
    lr_before, wd_before = lr_and_weight_decay(49, 100, t.optimizer, t.schedule)
    lr_after, wd_after = lr_and_weight_decay(50, 100, t.optimizer, t.schedule)
    assert wd_before == 0.1 and wd_after == 0.0
    assert lr_after == pytest.approx(6e-4) and lr_before > lr_after
    assert [sparsity_scale(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
