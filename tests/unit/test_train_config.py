"""Every configuration error is reported before any process group starts, naming the key and the fix."""

import json
import os
import subprocess
import sys

import pytest
import yaml

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
        (["train.mode=continue"], 1, "set train.init_from"),
        (["schedule.kind=linear"], 1, "is not one of cosine, polynomial, two_stage"),
        (["parallel.ep=2"], 2, "expert parallelism needs experts"),
        (["model.num_experts=3", "parallel.ep=2"], 2, r"must divide model.num_experts \(3\)"),
        (["parallel.vpp=2"], 1, "parallel.vpp: virtual pipeline stages need pipeline parallelism"),
        (["parallel.pp=2", "parallel.vpp=4", "optimizer.zero_stage=1"], 2, "VPP=4 .*not divisible by pp × vpp = 8"),
        (
            ["parallel.pp=2", "parallel.vpp=2", "optimizer.zero_stage=1", "batch.global_batch_size=12"],
            2,
            "batch.global_batch_size: interleaved 1F1B .* 3 microbatches per step is not a multiple of 2",
        ),
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
    # the CLI's prefix ("error:") aside, the last line names the file, the key the user set and the bound
    assert proc.stderr.splitlines()[-1].endswith("tiny-cpu.yaml: model.sparsity.fc2=1.5 must lie in [0, 1)")
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


# ---- values typed by the dataclass fields, ranges, the key the user wrote -------------------------------------


def test_yaml_and_set_values_take_the_field_types(tmp_path):
    data = config(tmp_path)
    path = tmp_path / "config.yaml"
    # YAML 1.1 (PyYAML) reads 3e-3, without a dot, as a string: the float field must still get a float.
    path.write_text(
        f"model: {{preset: tiny, norm_epsilon: 1e-6, sparsity: {{default: 5e-1}}}}\n"
        f"data: {{tokenizer: {data['data']['tokenizer']}, train: {data['data']['train']}}}\n"
        "optimizer: {lr: 3e-3, min_lr: 0}\n"
        "train: {steps: 1e3}\n"
        f"log: {{run_dir: {tmp_path / 'run'}}}\n"
    )
    assert yaml.safe_load(path.read_text())["optimizer"]["lr"] == "3e-3"
    cfg = load_config(path, ["schedule.warmup_steps=2.0", "schedule.stage2_lr=6e-4", "optimizer.zero_stage=none"])
    cfg.validate(1)
    typed = {
        "optimizer.lr": (cfg.optimizer.lr, 3e-3),
        "optimizer.min_lr": (cfg.optimizer.min_lr, 0.0),  # an int given for a float field
        "model.norm_epsilon": (cfg.model.norm_epsilon, 1e-6),
        "model.sparsity.default": (cfg.model.sparsity.default, 0.5),
        "train.steps": (cfg.train.steps, 1000),
        "schedule.warmup_steps": (cfg.schedule.warmup_steps, 2),
        "schedule.stage2_lr": (cfg.schedule.stage2_lr, 6e-4),
    }
    for key, (value, expected) in typed.items():
        assert value == expected and type(value) is type(expected), (key, value)
    assert cfg.optimizer.zero_stage is None and cfg.zero_stage == 2
    # to_dict round-trips, through JSON too (what a checkpoint records), with the same types.
    again = build_config(json.loads(json.dumps(cfg.to_dict())), source="again")
    assert again.to_dict() == cfg.to_dict() and type(again.optimizer.min_lr) is float


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model.bitnet=yes", "checkpoint.resume=OFF", "log.tensorboard=0"], (True, False, False)),
        (["model.bitnet=TRUE", "checkpoint.resume=no", "log.tensorboard=1"], (True, False, True)),
        (["model.bitnet=false", "checkpoint.resume=On", "log.tensorboard=True"], (False, True, True)),
    ],
)
def test_boolean_words(tmp_path, overrides, expected):
    c = build_config(config(tmp_path), overrides)
    assert (c.model.bitnet, c.checkpoint.resume, c.log.tensorboard) == expected
    assert all(type(v) is bool for v in (c.model.bitnet, c.checkpoint.resume, c.log.tensorboard))


@pytest.mark.parametrize(
    "overrides,message",
    [
        # types: the key as the user wrote it, the value, what it should be
        (["train.steps=abc"], "train.steps: 'abc' is not an integer"),
        (["train.steps=2.5"], "train.steps: 2.5 is not an integer"),
        (["parallel.tp=two"], "parallel.tp: 'two' is not an integer"),
        (["parallel.sp=maybe"], "parallel.sp: 'maybe' is not true or false (also accepted: yes/no, on/off, 1/0)"),
        (
            ["model.bitnet=yes_please"],
            "model.bitnet: 'yes_please' is not true or false (also accepted: yes/no, on/off, 1/0)",
        ),
        (["optimizer.lr=abc"], "optimizer.lr: 'abc' is not a number"),
        (["optimizer.lr=nan"], "optimizer.lr: 'nan' is not a finite number"),
        (["optimizer.lr=true"], "optimizer.lr: True is not a number"),
        (["model.sparsity.fc1=half"], "model.sparsity.fc1: 'half' is not a number"),
        (["model.num_experts=two"], "model.num_experts: 'two' is not an integer"),
        (["log.run_dir=[a, b]"], "log.run_dir: ['a', 'b'] is not a string; put it in quotes"),
        (["data.train=corpus"], "data.train: 'corpus' is not a list (write [a, b])"),
        (
            ["model.sparsity=0.5"],
            "model.sparsity: 0.5 is not a mapping; write model.sparsity.<key>=value with a key of "
            "['default', 'qkv', 'proj', 'fc1', 'fc2', 'block_size', 'ste']",
        ),
        # the ratio the user set, not the first site derived from it
        (["model.sparsity.default=1.0"], "model.sparsity.default=1.0 must lie in [0, 1)"),
        (["model.sparsity.default=0.5", "model.sparsity.proj=1.0"], "model.sparsity.proj=1.0 must lie in [0, 1)"),
        # ranges where a bad value crashes or misbehaves later
        (["batch.global_batch_size=0"], "batch.global_batch_size: must be >= 1"),
        (["batch.micro_batch_size=0"], "batch.micro_batch_size: must be >= 1"),
        (["optimizer.lr=0"], "optimizer.lr: must be > 0"),
        (["optimizer.lr=-1e-3"], "optimizer.lr: must be > 0"),
        (["optimizer.min_lr=-1e-5"], "optimizer.min_lr: must be >= 0"),
        (["optimizer.beta1=1"], "optimizer.beta1: must lie in [0, 1)"),
        (["optimizer.beta2=-0.1"], "optimizer.beta2: must lie in [0, 1)"),
        (["optimizer.eps=0"], "optimizer.eps: must be > 0"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay: must be >= 0"),
        (["optimizer.clip_grad=-1"], "optimizer.clip_grad: must be >= 0"),
        (["schedule.warmup_steps=-1"], "schedule.warmup_steps: must be >= 0"),
        (["schedule.decay_steps=0"], "schedule.decay_steps: must be >= 1"),
        (["schedule.power=0"], "schedule.power: must be > 0"),
        (["schedule.stage2_lr=0"], "schedule.stage2_lr: must be > 0"),
        (["train.steps=0"], "train.steps: must be >= 1"),
        (["train.seed=-1"], "train.seed: must lie in [0, 4294967296)"),
        (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps: must be >= 1"),
        (["train.sparsity_ramp_steps=-5"], "train.sparsity_ramp_steps: must be >= 0"),
        (["train.init_std=0"], "train.init_std: must be > 0"),
        (["checkpoint.interval=-1"], "checkpoint.interval: must be >= 0"),
        (["checkpoint.keep=-1"], "checkpoint.keep: must be >= 0"),
        (["log.eval_interval=-1"], "log.eval_interval: must be >= 0"),
        (["log.eval_iters=0"], "log.eval_iters: must be >= 1"),
        (["model.seq_length=0"], "model.seq_length: must be >= 1, got 0"),
        (["model.vocab_divisible_by=0"], "model.vocab_divisible_by: must be >= 1, got 0"),
        (["model.norm_epsilon=0"], "model.norm_epsilon: must be > 0, got 0.0"),
        (["model.init_method_std=-0.02"], "model.init_method_std: must be > 0, got -0.02"),
        (["model.num_query_groups=0"], "model.num_query_groups: must be >= 1, got 0"),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(config(tmp_path), overrides, source="config.yaml").validate(1)
    assert str(err.value) == f"config.yaml: {message}"


def test_yaml_values_are_checked_like_set_values(tmp_path):
    """The file and ``--set`` go through the same conversion: the same value gives the same error."""
    cases = [
        ("train", {"steps": "abc"}, ["train.steps=abc"]),
        ("parallel", {"tp": 2.5}, ["parallel.tp=2.5"]),
        ("model", {"bitnet": "yes_please"}, ["model.bitnet=yes_please"]),
        ("model", {"sparsity": {"default": 1.0}}, ["model.sparsity.default=1.0"]),
        ("batch", {"global_batch_size": 0}, ["batch.global_batch_size=0"]),
    ]
    for section, values, overrides in cases:
        messages = []
        for data, sets in ((config(tmp_path, **{section: values}), []), (config(tmp_path), overrides)):
            with pytest.raises(ConfigError) as err:
                build_config(data, sets, source="config.yaml").validate(1)
            messages.append(str(err.value))
        assert messages[0] == messages[1], messages
        assert overrides[0].partition("=")[0] in messages[0]


def test_boundary_values_are_accepted(tmp_path):
    """0 where 0 has a documented meaning: no clipping, keep every checkpoint, checkpoint/evaluate only at the end."""
    edges = [
        "optimizer.clip_grad=0",
        "optimizer.min_lr=0",
        "optimizer.beta1=0",
        "optimizer.weight_decay=0",
        "checkpoint.keep=0",
        "checkpoint.interval=0",
        "log.eval_interval=0",
        "schedule.warmup_steps=0",
        "schedule.decay_steps=null",
        "train.sparsity_ramp_steps=0",
        "train.seed=0",
        "data.cache_dir=None",
        "model.sparsity.qkv=null",
    ]
    cfg = build_config(config(tmp_path), edges).validate(1)
    assert (cfg.optimizer.clip_grad, cfg.checkpoint.keep, cfg.schedule.decay_steps, cfg.data.cache_dir) == (
        0.0,
        0,
        None,
        None,
    )


def test_checkpoint_verify_field(tmp_path):
    assert build_config(config(tmp_path)).checkpoint.verify is True
    cfg = build_config(config(tmp_path), ["checkpoint.verify=false"])
    assert cfg.checkpoint.verify is False and cfg.to_dict()["checkpoint"]["verify"] is False
    with pytest.raises(ConfigError, match="checkpoint.verify: 'sometimes' is not true or false"):
        build_config(config(tmp_path), ["checkpoint.verify=sometimes"])


def test_blend_weights_are_numbers(tmp_path):
    data = config(tmp_path)
    prefix = data["data"]["train"][0]
    data["data"]["train"] = [["heavy", prefix]]
    with pytest.raises(ConfigError, match=r"data.train: 'heavy' is not a number \(the weight of .*train\)"):
        build_config(data, source="config.yaml").validate(1)
    data["data"]["train"] = [[-1, prefix]]
    with pytest.raises(ConfigError, match="data.train: the weight of .*train must be > 0, got -1.0"):
        build_config(data, source="config.yaml").validate(1)
    data["data"]["train"] = [["0.7", prefix]]
    assert build_config(data).validate(1).blend(data["data"]["train"], "data.train") == [(0.7, prefix)]


def test_unknown_set_key_still_lists_the_known_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.lrr'; known here: \[.*'lr'.*'min_lr'"):
        build_config(config(tmp_path), ["optimizer.lrr=1e-3"])


def test_cli_bad_value_is_one_line_with_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    # megatron-core warns at import that TransformerEngine/apex are absent (expected on CPU): not part of the report.
    env = dict(os.environ, PYTHONWARNINGS="ignore:Transformer Engine and Apex are not installed")
    proc = subprocess.run(
        [
            sys.executable,
            "pretrain_scripts/pretrain_qsparse.py",
            "--config",
            f"{REPO_CONFIGS}/tiny-cpu.yaml",
            "--set",
            "train.steps=abc",
            "--set",
            f"log.run_dir={run_dir}",
            "--check",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "tiny-cpu.yaml: train.steps: 'abc' is not an integer" in lines[0], lines
    assert proc.stdout == "" and not run_dir.exists()
