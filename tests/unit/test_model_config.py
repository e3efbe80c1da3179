import json
import os
import subprocess
import sys

import pytest

from megatron_qsparse.model import QSparseConfig, preset
from megatron_qsparse.model.summary import summarize
from megatron_qsparse.sparsity import activated_parameters

MISTRAL_RATIOS = ["sparsity.qkv=0.514", "sparsity.proj=0.5", "sparsity.fc1=0.5", "sparsity.fc2=0.8"]


def test_mistral_7b_matches_paper_tables_1_and_2():
    s = summarize(preset("mistral-7b", MISTRAL_RATIOS))
    assert round(s["block_linear_parameters_N"] / 1e9, 2) == 6.98
    assert round(s["activated_parameters_N_a"] / 1e9, 3) == 2.915
    assert s["block_linear_parameters_N"] == 6_979_321_856
    assert abs(s["overall_sparsity"] - 0.582) < 1e-3


def test_summary_command_json():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_qsparse.model.summary", "--preset", "mistral-7b", "--json"]
        + [a for r in MISTRAL_RATIOS for a in ("--set", r)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    assert data["site_sparsity"] == {"qkv": 0.514, "proj": 0.5, "fc1": 0.5, "fc2": 0.8}
    assert round(data["activated_parameters_N_a"] / 1e9, 3) == 2.915


def test_summary_command_rejects_unknown_key():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_qsparse.model.summary", "--preset", "tiny", "--set", "sparsity.fc3=0.5"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown key 'sparsity.fc3'" in proc.stderr


def test_activated_parameters_formula():
    assert activated_parameters({"a": 100, "b": 50}, {"a": 0.5, "b": 0.8}) == (150, 60.0)


def test_paper_presets_shapes():
    expected = {
        "300m": (1024, 2730, 16, 24),
        "700m": (1536, 4096, 24, 24),
        "1.3b": (2048, 5460, 32, 24),
        "7b": (4096, 11008, 32, 32),
    }
    for name, (h, ffn, heads, layers) in expected.items():
        c = preset(name)
        assert (c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_layers) == (h, ffn, heads, layers)
        assert c.activation == "relu2" and c.seq_length == 2048


def test_moe_counts_only_routed_experts_as_activated():
    c = preset("tiny", ["num_experts=4", "moe_router_topk=2"])
    s = summarize(c)
    dense = summarize(preset("tiny"))
    assert s["site_parameters"]["fc1"] == 4 * dense["site_parameters"]["fc1"]
    assert (
        s["activated_parameters_N_a"]
        == dense["activated_parameters_N_a"] + dense["site_parameters"]["fc1"] + dense["site_parameters"]["fc2"]
    )


@pytest.mark.parametrize(
    "override,message",
    [
        (["sparsity.fc2=1.0"], r"sparsity.fc2=1.0 must lie in \[0, 1\)"),
        (["num_query_groups=3"], "not divisible by num_query_groups"),
        (["activation=gelu"], "unknown activation"),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", override)


@pytest.mark.parametrize(
    "layout,message",
    [
        (dict(tensor_model_parallel_size=3), "num_attention_heads=4 is not divisible"),
        (dict(pipeline_model_parallel_size=3), "num_layers=4 is not divisible"),
        (dict(expert_model_parallel_size=2), "needs num_experts"),
    ],
)
def test_bad_layout_is_named(layout, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny").to_transformer_config(**layout)


def test_block_size_not_dividing_tp_shard_is_named():
    c = preset("tiny", ["hidden_size=64", "ffn_hidden_size=96", "sparsity.default=0.5", "sparsity.block_size=32"])
    c.to_transformer_config()  # 96 channels of fc2 input: three blocks of 32 on one rank
    with pytest.raises(ValueError, match="block_size=32 does not divide the fc2 input shard"):
        c.to_transformer_config(tensor_model_parallel_size=2)


def test_round_trip_through_dict():
    c = preset("tiny", ["sparsity.default=0.5", "bitnet=true"])
    assert QSparseConfig.from_dict(c.to_dict()) == c


def test_values_take_the_field_types():
    c = preset(
        "tiny", ["norm_epsilon=1e-6", "rotary_base=500000", "bitnet=on", "sparsity.default=5e-1", "kv_channels=none"]
    )
    typed = {"norm_epsilon": 1e-6, "rotary_base": 500000.0, "bitnet": True, "kv_channels": None}
    assert {k: getattr(c, k) for k in typed} == typed
    assert type(c.norm_epsilon) is float and type(c.rotary_base) is float and c.sparsity.default == 0.5
    # what a checkpoint records (JSON) comes back equal, and strings of numbers from elsewhere are converted
    assert QSparseConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    data = dict(c.to_dict(), num_layers="2", sparsity={"default": "0.25", "ste": "false"})
    loaded = QSparseConfig.from_dict(data)
    assert (loaded.num_layers, loaded.sparsity.default, loaded.sparsity.ste) == (2, 0.25, False)


@pytest.mark.parametrize(
    "override,message",
    [
        (["num_layers=abc"], "model.num_layers: 'abc' is not an integer"),
        (["hidden_size=2.5"], "model.hidden_size: 2.5 is not an integer"),
        (["bitnet=yes_please"], "model.bitnet: 'yes_please' is not true or false (also accepted: yes/no, on/off, 1/0)"),
        (
            ["sparsity.ste=maybe"],
            "model.sparsity.ste: 'maybe' is not true or false (also accepted: yes/no, on/off, 1/0)",
        ),
        (["norm_epsilon=small"], "model.norm_epsilon: 'small' is not a number"),
        (["sparsity.default=1.0"], "model.sparsity.default=1.0 must lie in [0, 1)"),
        (["sparsity.default=0.5", "sparsity.fc1=-0.5"], "model.sparsity.fc1=-0.5 must lie in [0, 1)"),
        (["seq_length=0"], "model.seq_length: must be >= 1, got 0"),
        (["vocab_divisible_by=0"], "model.vocab_divisible_by: must be >= 1, got 0"),
        (["kv_channels=0"], "model.kv_channels: must be >= 1, got 0"),
        (["norm_epsilon=0"], "model.norm_epsilon: must be > 0, got 0.0"),
        (["rotary_base=-1"], "model.rotary_base: must be > 0, got -1.0"),
        (["moe_aux_loss_coeff=-0.01"], "model.moe_aux_loss_coeff: must be >= 0, got -0.01"),
        (["num_experts=4", "moe_ffn_hidden_size=0"], "model.moe_ffn_hidden_size: must be >= 1, got 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        preset("tiny", override)
    assert str(err.value) == message


def test_summary_command_bad_value_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_qsparse.model.summary", "--preset", "tiny", "--set", "num_layers=four"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore:Transformer Engine and Apex are not installed"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("model.num_layers: 'four' is not an integer")
