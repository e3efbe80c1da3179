"""MFU as Megatron-LM counts it (``mfu``) and at the activated size of the block linears (``mfu_activated``).

Megatron-LM's count (megatron/training/training.py, ``num_floating_point_operations``, MHA/GQA branch, no MTP),
per token, with q = heads·head_dim and kv = query_groups·head_dim, factors 3 (forward + two backward GEMMs) and
2 (multiply-add):

    3·2·L·[h·(q + 2·kv) + q·seq/2·2 + q·h]          projections and causal attention scores
  + 3·2·L·h·ffn·3·top_k                             the GLU MLP (gate, up, down) of the routed experts
  + 3·2·h·padded_vocab                              the logits
"""

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_qsparse.model.config import QSparseConfig, preset
from megatron_qsparse.model.summary import activated_flops_per_token, model_flops_per_token
from megatron_qsparse.training import telemetry

SMALL = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=80,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    vocab_size=1000,  # padded to 1024
    seq_length=32,
)


def test_small_dense_gqa_by_hand():
    # q = 4·16 = 64, kv = 2·16 = 32
    # projections per layer: 6·(64·(64 + 2·32) + 64·64)   = 6·(8192 + 4096) = 73_728
    # MLP per layer:         6·64·80·3                    = 92_160
    # attention scores:      6·64·32 per layer, 2 layers  = 24_576
    # logits:                6·64·1024                    = 393_216
    # total: 2·(73_728 + 92_160) + 24_576 + 393_216       = 749_568
    cfg = QSparseConfig(**SMALL)
    assert model_flops_per_token(cfg) == 749_568
    # the sequence enters only the attention scores: twice the sequence, twice that term
    assert model_flops_per_token(cfg, seq_length=64) == 749_568 + 24_576


def test_small_moe_counts_the_routed_experts():
    # 4 experts of 48, top-2: MLP per layer 6·64·48·3·2 = 110_592 (not the 4 experts' 221_184)
    # total: 2·(73_728 + 110_592) + 24_576 + 393_216 = 786_432
    cfg = QSparseConfig(**SMALL, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)
    assert model_flops_per_token(cfg) == 786_432


def test_7b_preset_equals_megatron_lm_to_the_digit():
    # 7b: L=32, h=4096, ffn=11008, 32 heads of 128 (q = kv = 4096), vocab 32000 (a multiple of 128), seq 2048
    # projections per layer: 6·(4096·(4096 + 2·4096) + 4096·4096) = 402_653_184
    # scores per layer:      6·4096·2048/2·2                       = 50_331_648
    # MLP per layer:         6·4096·11008·3                        = 811_597_824
    # logits:                6·4096·32000                          = 786_432_000
    # total: 32·(402_653_184 + 50_331_648 + 811_597_824) + 786_432_000
    #      = 32·1_264_582_656 + 786_432_000 = 40_466_644_992 + 786_432_000 = 41_253_076_992
    assert model_flops_per_token(preset("7b")) == 41_253_076_992
    # Megatron-LM's FLOPs per iteration are batch·seq times this: a global batch of 512 at seq 2048
    assert 512 * 2048 * model_flops_per_token(preset("7b")) == 43_256_986_459_963_392
    # (6·N alone, N = 6_476_005_376 block-linear weights, would be 38_856_032_256: attention and logits are 6%)


def test_mistral_7b_gqa_equals_megatron_lm():
    # mistral-7b: L=32, h=4096, ffn=14336, 32 heads of 128 in 8 groups (kv = 1024), vocab 32000, seq 4096
    # projections per layer: 6·(4096·(4096 + 2048) + 4096·4096) = 251_658_240
    # scores per layer:      6·4096·4096                        = 100_663_296
    # MLP per layer:         6·4096·14336·3                     = 1_056_964_608
    # total: 32·1_409_286_144 + 786_432_000                     = 45_883_588_608
    assert model_flops_per_token(preset("mistral-7b")) == 45_883_588_608


def test_activated_count_scales_only_the_block_linears():
    cfg = QSparseConfig(**SMALL)
    sparsity = {"qkv": 0.5, "proj": 0.25, "fc1": 0.5, "fc2": 0.75}
    # per layer N_a = 8192·0.5 + 4096·0.75 + 10240·0.5 + 5120·0.25 = 13_568; 6·2·13_568 = 162_816
    # plus the same attention scores (24_576) and logits (393_216): 580_608
    assert activated_flops_per_token(cfg, sparsity) == 580_608
    # at zero sparsity it is Megatron-LM's count, dense and MoE (6·N_a reaches the same sum another way)
    for model in (cfg, QSparseConfig(**SMALL, num_experts=4, moe_ffn_hidden_size=48), preset("7b")):
        assert activated_flops_per_token(model, {}) == model_flops_per_token(model)


def test_peak_is_the_devices_dense_bf16_peak_times_the_ranks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert telemetry.peak_flops() is None and telemetry.mfu_fields(1.0, 2.0, 1.0) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(telemetry.dist, "get_world_size", lambda *a: 2)
    assert telemetry.peak_flops() == 2 * 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce GTX 1080")
    assert telemetry.peak_flops() is None


TINY_FLOPS = 33_128_448  # tiny (L=4, h=256, ffn=688, 4 heads of 64, vocab 8192, seq 256):
# 4·(6·(256·768 + 256·256) + 6·256·688·3) + 4·6·256·256 + 6·256·8192 = 18_972_672 + 1_572_864 + 12_582_912
TINY_ACTIVATED_HALF = 23_642_112  # 6·0.5·N (N = 3_162_112) + 1_572_864 + 12_582_912


def metrics_of(monkeypatch, peak):
    """``Trainer._metrics`` of one step of the tiny model (32 sequences of 256 tokens in 0.5 s: 16384 tok/s) at
    measured sparsity 0.5 on every site, without a process group: the all-reduced sparsity and the peak faked."""
    from megatron_qsparse.training import trainer

    cfg = SimpleNamespace(model=preset("tiny"), batch=SimpleNamespace(global_batch_size=32))
    assert model_flops_per_token(cfg.model) == TINY_FLOPS
    monkeypatch.setattr(trainer, "sparsity_by_layer", lambda model, layers: torch.full((layers, 4), 0.5))
    monkeypatch.setattr(telemetry, "peak_flops", lambda: peak)
    fake = SimpleNamespace(
        cfg=cfg, model=None, engine=SimpleNamespace(get_global_grad_norm=lambda: 1.5), _evaluates=lambda done: False
    )
    record = trainer.Trainer._metrics(fake, 7, 3.25, 1e-3, 0.5, None)
    return record, trainer.Trainer._line(record, 10)


def test_record_and_console_line_carry_both_labels(monkeypatch):
    record, line = metrics_of(monkeypatch, peak=1e12)
    assert record["tokens_per_s"] == 16384
    assert record["mfu"] == pytest.approx(16384 * TINY_FLOPS / 1e12)  # 0.5428
    assert record["mfu_activated"] == pytest.approx(16384 * TINY_ACTIVATED_HALF / 1e12)  # 0.3874
    assert line.endswith("| mfu 54.3% (activated 38.7%)"), line


def test_without_a_peak_neither_is_reported(monkeypatch):
    record, line = metrics_of(monkeypatch, peak=None)
    assert "mfu" not in record and "mfu_activated" not in record and "mfu" not in line


def test_metrics_jsonl_and_tensorboard_have_both(monkeypatch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(telemetry.dist, "get_rank", lambda *a: 0)
    writer = telemetry.MetricsWriter(tmp_path, tensorboard=True, start_step=0)
    writer.write({"step": 3, "loss": 2.0, "mfu": 0.4, "mfu_activated": 0.25, "sparsity": {"qkv": 0.5}})
    writer.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (record["mfu"], record["mfu_activated"]) == (0.4, 0.25)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["mfu"] == [(3, pytest.approx(0.4))] and scalars["mfu_activated"] == [(3, pytest.approx(0.25))]
