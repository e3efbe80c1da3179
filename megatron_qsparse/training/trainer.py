"""The training loop: pretraining, continue-training (with a sparsity ramp) and SFT, at any TP/SP/PP/DP/EP layout.

Each step: set LR / weight decay (and the sparsity ramp), run the global batch through megatron-core's schedule
with the DeepSpeed engine as the forward, agree on the loss across ranks, then either ``engine.step()`` (ZeRO
reduces, clips, updates) or skip a non-finite step. Checkpoints are written at the interval, at the end, and when
SIGTERM/SIGUSR1 (exit 75: requeue and resume) or Ctrl-C (exit 130) arrives. One run at a time owns its run
directory (``rundir.py``): a lock, and a run id in every checkpoint it writes.
"""

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_qsparse import errors
from megatron_qsparse.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED, UserError
from megatron_qsparse.layers.site import record_sparsity, scale_sparsity
from megatron_qsparse.model.gpt import build_gpt_model
from megatron_qsparse.model.init import default_init, initialize_weights
from megatron_qsparse.model.summary import activated_flops_per_token, model_flops_per_token, summarize
from megatron_qsparse.parallel.embedding_grads import allreduce_tied_embedding_grads, tie_embedding_copies
from megatron_qsparse.parallel.grads import install_sequence_parallel_grad_hooks
from megatron_qsparse.parallel.host_collectives import all_reduce_host
from megatron_qsparse.parallel.layout import ParallelLayout
from megatron_qsparse.parallel.rank0 import on_rank_0
from megatron_qsparse.parallel.state import initialize_model_parallel
from megatron_qsparse.sparsity.stats import activated_parameters
from megatron_qsparse.training import checkpoint as ckpt
from megatron_qsparse.training import rundir
from megatron_qsparse.training.config import TrainConfig, split_weights
from megatron_qsparse.training.optimizer import build_engine, discard_step, init_deepspeed_comm
from megatron_qsparse.training.schedules import lr_and_weight_decay, sparsity_scale
from megatron_qsparse.training.step import forward_backward, global_mean_loss
from megatron_qsparse.training.telemetry import (
    GradientCapture,
    MetricsWriter,
    console,
    mfu_fields,
    site_means,
    sparsity_by_layer,
)


class TrainingStopped(SystemExit):
    pass


class PreemptionFlag:
    """SIGTERM / SIGUSR1 / SIGINT only set a flag; ranks agree on it after each step, checkpoint and stop together.
    A second Ctrl-C stops at once (the last checkpoint is left as it was)."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None or signum == signal.SIGINT:
            self.signal = signum
        if signum == signal.SIGINT:
            console("Ctrl-C: finishing the step and writing a checkpoint (Ctrl-C again to stop at once)")

    def agreed(self) -> Optional[int]:
        """The exit code every rank stops with (130 if any rank saw SIGINT, else 75), or None to go on."""
        flag = torch.tensor([{None: 0, signal.SIGINT: 2}.get(self.signal, 1)])
        flag = all_reduce_host(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: EXIT_PREEMPTED, 2: EXIT_INTERRUPTED}[int(flag.item())]


@dataclass
class Data:
    train: object
    valid: Optional[object]
    valid_bytes: int  # UTF-8 bytes of the evaluated target text (bits per byte)
    valid_tokens: int


SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "query_groups",
    "head_dim",
    "padded_vocab_size",
    "num_experts",
    "moe_ffn_hidden_size",
    "add_qkv_bias",
    "tie_embeddings",
    "normalization",
)


def _check_same_shape(source: Path, cfg: TrainConfig) -> None:
    """A clear error instead of a tensor-shape failure deep in the checkpoint loader."""
    saved_cfg = ckpt.read_model_config(source)
    differs = {
        k: (getattr(saved_cfg, k), getattr(cfg.model, k))
        for k in SHAPE_FIELDS
        if getattr(saved_cfg, k) != getattr(cfg.model, k)
    }
    if differs:
        raise UserError(
            f"train.init_from={source}: the checkpoint's model differs from the config's "
            f"(checkpoint, config): {differs}; set the model section to match it"
        )


def _dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.train.dtype]


def _build_data(cfg: TrainConfig, tokenizer, world_size: int) -> Data:
    from megatron_qsparse.data.gpt_data import SFTDataset, build_gpt_datasets, check_corpus_tokenizer, microbatches

    g = cfg.batch.global_batch_size
    seq = cfg.model.seq_length
    eval_samples = cfg.log.eval_iters * g
    if cfg.train.mode == "sft":
        train = SFTDataset(Path(cfg.data.sft), tokenizer, seq, cfg.data.prompt_key, cfg.data.response_key)
        valid = (
            SFTDataset(Path(cfg.data.sft_valid), tokenizer, seq, cfg.data.prompt_key, cfg.data.response_key)
            if cfg.data.sft_valid
            else None
        )
    else:
        blends = {key: cfg.blend(getattr(cfg.data, key[5:]), key) for key in ("data.train", "data.valid")}
        for key, pairs in blends.items():  # a corpus of another tokenizer: one line, not an IndexError later
            check_corpus_tokenizer([prefix for _, prefix in pairs], tokenizer, cfg.model.vocab_size, key)
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else cfg.run_dir / "data_cache"
        train, valid = build_gpt_datasets(
            blends["data.train"],
            blends["data.valid"],
            tokenizer,
            seq,
            cfg.train.seed,
            cfg.train.steps * g,
            eval_samples,
            cache,
            split=split_weights(cfg.data.split) if cfg.data.split is not None else None,  # Megatron-LM's --split
        )
    valid_bytes = valid_tokens = 0
    if valid is not None:
        for batch in microbatches(valid, 0, eval_samples, g, 0, 1):
            for labels, mask in zip(batch["labels"], batch["loss_mask"]):
                kept = labels[mask > 0].tolist()
                valid_tokens += len(kept)
                valid_bytes += len(tokenizer.detokenize(kept).encode("utf-8"))
    return Data(train, valid, valid_bytes, valid_tokens)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.preemption = PreemptionFlag()  # first: a signal during start-up must not kill the job unsaved
        self.world_size = dist.get_world_size()
        cfg.validate(self.world_size)
        self.layout = cfg.parallel
        initialize_model_parallel(self.layout, seed=cfg.train.seed)
        init_deepspeed_comm()
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.dtype = _dtype(cfg)
        self.model = self._build_model()
        self.resume_from, self.run_id = on_rank_0(self._claim_run_directory)
        if self.resume_from is None and cfg.train.init_from:
            source = on_rank_0(ckpt.resolve_checkpoint, Path(cfg.train.init_from))  # hashed once, not per rank
            _check_same_shape(source, cfg)
            console(f"initializing weights from {source}")
            ckpt.load_model(self.model, source)
        self.num_microbatches = cfg.num_microbatches(self.world_size)
        self.engine = self._build_engine()
        self.start_step = self.sample_offset = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        self.tokenizer = self._load_tokenizer()
        self.data = _build_data(cfg, self.tokenizer, self.world_size)
        self.writer = MetricsWriter(cfg.run_dir, cfg.log.tensorboard, self.start_step)
        self.summary = summarize(cfg.model)

    # ---- start-up ----------------------------------------------------------------------------------------
    def _claim_run_directory(self):
        """Rank 0: lock the run and checkpoint directories, then find what to resume (the newest verified
        checkpoint) and the run id to write under; a new run is refused where another run's checkpoints are."""
        cfg = self.cfg
        self.lock = rundir.RunLock([cfg.run_dir, cfg.checkpoint_dir])
        latest = ckpt.find_latest(cfg.checkpoint_dir, verify=cfg.checkpoint.verify) if cfg.checkpoint.resume else None
        if latest is not None:
            return latest, ckpt.read_trainer_state(latest).get("run_id") or rundir.new_run_id()
        existing = sorted(p for p in cfg.checkpoint_dir.glob("step_*") if p.is_dir())
        if existing and cfg.checkpoint.resume:
            raise UserError(
                f"{cfg.checkpoint_dir} holds checkpoints ({', '.join(p.name for p in existing[-3:])}) but none is "
                f"complete and intact (see above); move them away, or start this run in a new directory "
                f"(--set log.run_dir=NEW)"
            )
        rundir.refuse_foreign_checkpoints(cfg.checkpoint_dir, existing, cfg.train.init_from)
        return None, rundir.new_run_id()

    def _build_model(self):
        """This rank's model stage under the layout, initialized the same whatever the layout."""
        cfg, p = self.cfg, self.layout
        tc = cfg.model.to_transformer_config(
            p.tp, p.pp, p.ep, p.sp, params_dtype=self.dtype, virtual_pipeline_model_parallel_size=p.vpp
        )
        model = build_gpt_model(cfg.model, tc)
        if torch.cuda.is_available():
            model.cuda()
        if p.sp:
            install_sequence_parallel_grad_hooks(model)
        initialize_weights(model, cfg.train.seed, default_init(cfg.train.init_std, cfg.model.num_layers))
        tie_embedding_copies(model)  # PP with tied embeddings: the last stage's copy equals the first's
        return model

    def _build_engine(self):
        o = self.cfg.optimizer
        return build_engine(
            self.model,
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            clip_grad=o.clip_grad,
            zero_stage=self.cfg.zero_stage,
            micro_batch_size=self.cfg.batch.micro_batch_size,
            num_microbatches=self.num_microbatches,
            bf16=self.dtype == torch.bfloat16,
        )

    def _load_tokenizer(self):
        from megatron_qsparse.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        if tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise UserError(
                f"data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{self.cfg.model.vocab_size}: raise model.vocab_size"
            )
        return tokenizer

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {
            "layout": vars(self.layout),
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
            "run_id": self.run_id,
            "format": 2,  # 2: the optimizer state is layout-independent (optimizer_state.py)
        }

    def _resume(self, path: Path) -> None:
        """Weights and optimizer state under this layout, whatever layout wrote them; the RNG states of the same
        rank where the layout is the same (exact resume), else re-derived from the seed and the step."""
        state = ckpt.read_trainer_state(path)
        saved = f"layout {state['layout']} on {state['world_size']} processes"
        saved_layout = {**vars(ParallelLayout()), **state["layout"]}  # written before a field existed: its default
        same_layout = saved_layout == vars(self.layout) and state["world_size"] == self.world_size
        if not same_layout and not ckpt.has_reshardable_optimizer(path):
            raise UserError(
                f"{path} was written with {saved} in the older per-rank optimizer format, which resumes under "
                f"that layout only. To start a new run from its weights under this layout: "
                f"--set train.init_from={path} --set log.run_dir=NEW"
            )
        ckpt.load_model(self.model, path)
        ckpt.load_optimizer(self.model, self.engine, path)
        self.start_step = state["step"]
        self.sample_offset = self._sample_offset(state)
        if same_layout:
            ckpt.load_rng(path)
            console(f"resumed from {path} at step {self.start_step}")
            return
        ckpt.rederive_rng(self.cfg.train.seed + self.start_step)
        console(
            f"resumed from {path} at step {self.start_step}, written with {saved}: weights and optimizer state "
            f"resharded to layout {vars(self.layout)} on {self.world_size} processes; RNG states re-derived from "
            f"train.seed and the step (the same layout would have resumed them exactly)"
        )

    def _sample_offset(self, state: dict) -> int:
        """Where the data stream continues, in global samples: the saved run consumed ``consumed_samples``; a
        new global batch size continues from that sample, not from ``step · new size``."""
        consumed = state.get("consumed_samples", state["step"] * self.cfg.batch.global_batch_size)
        return consumed - state["step"] * self.cfg.batch.global_batch_size

    def consumed_samples(self, step: int) -> int:
        return self.sample_offset + step * self.cfg.batch.global_batch_size

    def save(self, step: int, background: bool = False) -> Path:
        """A checkpoint of ``step``; ``background`` (interval saves with ``checkpoint.async_save``): written by a
        writer process while training goes on, at most one at a time."""
        self.finish_background_save(blocking=True)
        t0 = time.time()
        state = dict(self._trainer_state(), consumed_samples=self.consumed_samples(step))
        keep, root = self.cfg.checkpoint.keep, self.cfg.checkpoint_dir
        if background:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.saves = getattr(self, "saves", None) or AsyncCallsQueue()
            path = ckpt.start_background_save(root, step, self.model, self.engine, state, keep, self.saves)
            self.pending_save = (path, t0)
            console(f"checkpoint {path.name}: writing in the background ({time.time() - t0:.1f}s to start)")
            return path
        path = ckpt.save_checkpoint(root, step, self.model, self.engine, state, keep)
        console(f"saved checkpoint {path} ({time.time() - t0:.1f}s)")
        return path

    def finish_background_save(self, blocking: bool) -> None:
        """Collective: conclude the background save once every rank's writer is done (or wait for it). A failed
        one is said in one line; ``latest`` and the older checkpoints are untouched and training goes on."""
        from torch.distributed.checkpoint.api import CheckpointException

        pending = getattr(self, "pending_save", None)
        if pending is None:
            return
        path, t0 = pending
        try:
            if not self.saves.maybe_finalize_async_calls(blocking=blocking):
                return
            console(f"saved checkpoint {path} (in the background, {time.time() - t0:.1f}s)")
        except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
            known = errors.exit_code_and_message(err)
            reason = known[1] if known else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            latest = ckpt.find_latest(self.cfg.checkpoint_dir, verify=False)
            console(
                f"checkpoint {path.name} failed in the background ({reason}); latest is still "
                f"{latest.name if latest else 'none'}; training goes on"
            )
        self.pending_save = None

    # ---- steps -------------------------------------------------------------------------------------------
    def _batches(self, dataset, step: int, global_batch: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
        from megatron_qsparse.data.gpt_data import microbatches

        ps = self.ps
        return microbatches(
            dataset,
            step,
            global_batch or self.cfg.batch.global_batch_size,
            self.cfg.batch.micro_batch_size,
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(),
            offset=self.sample_offset if dataset is self.data.train else 0,
        )

    def _forward(self, tokens, positions, **chunk):
        return self.engine(tokens, positions, None, **chunk)

    def _set_hyperparameters(self, step: int) -> float:
        lr, wd = lr_and_weight_decay(step, self.cfg.train.steps, self.cfg.optimizer, self.cfg.schedule)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group.get("decays", True) else 0.0
        if self.cfg.train.sparsity_ramp_steps:
            scale_sparsity(self.model, sparsity_scale(step, self.cfg.train.sparsity_ramp_steps))
        return lr

    def _skip_step(self) -> None:
        discard_step(self.engine)

    def _eval_interval_hits(self, done: int) -> bool:
        interval = self.cfg.log.eval_interval
        return bool(interval) and done % interval == 0

    def _evaluates(self, done: int) -> bool:
        """Whether the step that brings the count to ``done`` evaluates (and records per-layer telemetry)."""
        return self._eval_interval_hits(done) or done == self.cfg.train.steps

    def evaluate(self) -> Optional[dict]:
        if self.data.valid is None:
            return None
        self.model.eval()
        losses = []
        with torch.no_grad():
            for i in range(self.cfg.log.eval_iters):
                local = forward_backward(
                    lambda t, p, **chunk: self.model(t, p, None, **chunk),
                    self.model,
                    self._batches(self.data.valid, i),
                    self.cfg.model.seq_length,
                    forward_only=True,
                )
                losses.append(global_mean_loss(local))
        self.model.train()
        loss = sum(losses) / len(losses)
        bpb = loss * self.data.valid_tokens / max(self.data.valid_bytes, 1) / math.log(2)
        return {"loss": loss, "bits_per_byte": bpb}

    def train_step(self, step: int) -> Optional[dict]:
        """Global batch ``step`` (0-based): forward/backward, the loss agreed across ranks, the update. Returns the
        step's metrics, or None when a non-finite loss made it skip the update."""
        cfg = self.cfg
        lr = self._set_hyperparameters(step)
        record_sparsity(self.model, True)
        # Per-layer gradient norms only where they are reported (gradient hooks cost time).
        capture = GradientCapture(self.model) if self._eval_interval_hits(step + 1) else None
        t0 = time.time()
        local = forward_backward(self._forward, self.model, self._batches(self.data.train, step), cfg.model.seq_length)
        loss = global_mean_loss(local)
        layer_grads = capture.layer_norms(cfg.model.num_layers) if capture else None
        if not math.isfinite(loss):
            self._skip_nonfinite(step + 1, loss)
            return None
        self.nonfinite = 0
        allreduce_tied_embedding_grads(self.model)  # PP with tied embeddings: both copies get the summed gradient
        self.engine.step()
        elapsed = time.time() - t0
        return self._metrics(step + 1, loss, lr, elapsed, layer_grads)

    def _skip_nonfinite(self, done: int, loss: float) -> None:
        self._skip_step()
        self.nonfinite += 1
        console(f"step {done}: non-finite loss {loss}, step skipped ({self.nonfinite} in a row)")
        self.writer.write({"step": done, "loss": loss, "skipped": True})
        if self.nonfinite >= self.cfg.train.max_nonfinite_steps:
            console(f"aborting: {self.nonfinite} consecutive non-finite losses; the last checkpoint is intact")
            raise TrainingStopped(EXIT_NONFINITE)

    def _metrics(self, done: int, loss: float, lr: float, elapsed: float, layer_grads) -> dict:
        cfg = self.cfg
        per_layer = sparsity_by_layer(self.model, cfg.model.num_layers)
        sparsity = site_means(per_layer)
        tokens_per_s = cfg.batch.global_batch_size * cfg.model.seq_length / elapsed
        _, activated = activated_parameters(cfg.model.activated_block_linear_params(), sparsity)
        record = {
            "step": done,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(self.engine.get_global_grad_norm()),
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed,
            "sparsity": sparsity,
            "activated_params": activated,
        }  # N_a with the measured per-site input sparsity
        # GPU only: mfu counts FLOPs as Megatron-LM does (dense), mfu_activated at the measured sparsity.
        seq = cfg.model.seq_length
        flops = model_flops_per_token(cfg.model, seq), activated_flops_per_token(cfg.model, sparsity, seq)
        record.update(mfu_fields(tokens_per_s, *flops))
        if self._evaluates(done):
            record["layers"] = {"sparsity": {s: per_layer[:, i].tolist() for i, s in enumerate(sparsity)}}
            if layer_grads is not None:
                record["layers"]["grad_norm"] = layer_grads.tolist()
        return record

    def _log(self, record: dict) -> None:
        self.writer.write(record)
        done, steps = record["step"], self.cfg.train.steps
        if done % self.cfg.log.interval == 0 or done == steps or done == self.start_step + 1 or "eval" in record:
            console(self._line(record, steps))

    def _save_or_stop(self, done: int) -> None:
        """The interval checkpoint, and on an agreed preemption signal a checkpoint and the exit."""
        steps = self.cfg.train.steps
        self.finish_background_save(blocking=False)
        if self.cfg.checkpoint.interval and done % self.cfg.checkpoint.interval == 0 and done < steps:
            self.save(done, background=self.cfg.checkpoint.async_save)
        code = self.preemption.agreed() if done < steps else None
        if code is not None:
            self.save(done)
            console(f"stopping on signal {self.preemption.signal} at step {done}; exit {code}")
            raise TrainingStopped(code)

    def _banner(self) -> str:
        cfg, s = self.cfg, self.summary
        return (
            f"training {cfg.model_preset} ({s['total_parameters'] / 1e6:.1f}M parameters, "
            f"N={s['block_linear_parameters_N'] / 1e6:.1f}M, N_a={s['activated_parameters_N_a'] / 1e6:.1f}M) "
            f"layout {self.layout} on {self.world_size} processes, {self.num_microbatches} microbatches, "
            f"ZeRO-{cfg.zero_stage}, {self.dtype}, steps {self.start_step}..{cfg.train.steps}"
        )

    def train(self) -> dict:
        steps = self.cfg.train.steps
        console(self._banner())
        self.nonfinite = 0
        first_loss = last_loss = last_eval = None
        for step in range(self.start_step, steps):
            record = self.train_step(step)
            if record is None:
                continue
            first_loss = record["loss"] if first_loss is None else first_loss
            last_loss = record["loss"]
            if "layers" in record:
                last_eval = self.evaluate()
                if last_eval:
                    record["eval"] = last_eval
            self._log(record)
            self._save_or_stop(record["step"])
        final = self.save(steps) if self.start_step < steps else self.resume_from
        self.writer.close()
        if dist.get_rank() == 0:
            self.lock.release()
        return {
            "first_loss": first_loss,
            "last_loss": last_loss,
            "eval": last_eval,
            "checkpoint": str(final),
            "steps": steps,
        }

    @staticmethod
    def _line(r: dict, steps: int) -> str:
        sp = " ".join(f"{k} {v:.2f}" for k, v in r["sparsity"].items())
        line = (
            f"step {r['step']:>6}/{steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad {r['grad_norm']:.3f} "
            f"| {r['tokens_per_s']:,.0f} tok/s | sparsity {sp}"
        )
        if "mfu" in r:
            line += f" | mfu {100 * r['mfu']:.1f}% (activated {100 * r['mfu_activated']:.1f}%)"
        if "eval" in r:
            line += f" | eval loss {r['eval']['loss']:.4f} bpb {r['eval']['bits_per_byte']:.3f}"
        return line
