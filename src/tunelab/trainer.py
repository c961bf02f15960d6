"""The transformers Trainer, plus only what tunelab adds to it.

- `evaluate` reports token-weighted validation loss and perplexity (the stock loop averages
  per-batch means), so early stopping and best-checkpoint selection use the number we report; for a
  mixture also each source's loss (`eval_loss_<source>`), from the same pass over the same rows.
- mid-run validations can also score greedy generations (`train.eval_generation`), so early
  stopping and the best checkpoint can follow a task metric instead of the loss.
- a non-finite loss stops the run, naming the step, before any checkpoint holds its update: each
  step's loss is checked on the GPU into a flag, which the host reads where it waits for the GPU
  anyway (logging steps, checkpoints, the end), so the loop never stops for a check of its own.
- `StepClock` (tunelab.speed) times data, forward+backward, optimizer, evaluation and saving the
  same way, and the validation at the last step is kept (`last_eval`) so "after" need not repeat it.
- the train and eval loaders collate with their own `Collator`, so token counts are training tokens.
- `ResumeGuard` keeps a run resumed from its final checkpoint from training past its end.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments

from tunelab.config import Config
from tunelab import distributed
from tunelab.distributed import eval_loader, trainer_arguments
from tunelab.errors import TunelabError
from tunelab.evals.loss import loss_sums, summarize
from tunelab.models.build import has_cuda, precision
from tunelab.speed import StepClock


class TunelabTrainer(Trainer):
    def __init__(self, *args, generation=None, eval_collator=None, eval_parts=None, **kwargs):
        """generation: (train.eval_generation, validation examples, eval settings) to also score
        generations at mid-run validations, or None. eval_collator: the validation loader's collator
        (default: the training one). eval_parts: a mixture's validation rows per source, whose
        concatenation is `eval_dataset` (PreparedData.eval_parts)."""
        super().__init__(*args, **kwargs)
        self.generation = generation
        self.eval_parts = eval_parts or {}
        self.eval_collator = eval_collator or self.data_collator
        self.clock = StepClock(cuda=self.args.device.type == "cuda")
        self.last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest validation in training
        self._first_bad = self._bad_loss = None  # on the device: first step with a non-finite loss (0: none), its loss
        self._backward_end = None
        self._tokens_counted = 0
        self.add_callback(_OptimizerClock(self))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        start = time.time()
        parts = self.eval_parts if eval_dataset is None else {}
        sums = {name: loss_sums(self.model, eval_loader(self, rows), f"validation loss ({name})")
                for name, rows in parts.items()} or {None: loss_sums(self.model, eval_loader(self, eval_dataset))}
        result = summarize(sum(t for t, _ in sums.values()).item(), sum(c for _, c in sums.values()).item())
        metrics = {
            f"{metric_key_prefix}_loss": result["loss"],
            f"{metric_key_prefix}_perplexity": result["perplexity"],
            f"{metric_key_prefix}_tokens": result["tokens"],
        }
        for name in parts:
            total, count = sums[name]
            metrics[f"{metric_key_prefix}_loss_{name}"] = summarize(total.item(), count.item())["loss"]
        if self.is_in_train and self.generation:
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.generation_scores().items()})
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 3)
        if self.is_in_train:
            self.clock.host("evaluation", time.time() - start)
            self.last_eval = (self.state.global_step, metrics)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def get_eval_dataloader(self, eval_dataset=None):
        """transformers builds every loader with `self.data_collator`; validation batches get theirs."""
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def generation_scores(self) -> dict:
        """The eval_generation metric on the first N validation rows, when this step is due."""
        from tunelab.evals.generation import generation_eval

        gen, examples, eval_cfg = self.generation
        if self.state.global_step % (gen.every or 1):
            return {}
        scores, _ = generation_eval(
            self.model, self.processing_class, examples, gen.samples, [gen.task], eval_cfg.max_new_tokens,
            eval_cfg.batch_size, desc=f"generating (step {self.state.global_step})",
        )
        return scores

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        batches = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.clock.host("data", time.perf_counter() - start)
        return batches

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = self.clock.mark()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.clock.span("forward_backward", start)
        self._backward_end = self.clock.mark()
        self._watch(loss)
        # the progress lines' tok/s, from the collator's host-side count (transformers' own count syncs every step)
        seen = getattr(self.data_collator, "real_tokens", 0) * self.args.world_size
        self.state.num_input_tokens_seen += seen - self._tokens_counted
        self._tokens_counted = seen
        return loss

    def _watch(self, loss) -> None:
        """Keep the first step whose loss is not finite, on the loss's device: no host sync."""
        import torch

        if self._first_bad is None:
            self._first_bad = torch.zeros((), dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        new = ~torch.isfinite(loss) & (self._first_bad == 0)
        self._first_bad = torch.where(new, self.state.global_step + 1, self._first_bad)
        self._bad_loss = torch.where(new, loss.float(), self._bad_loss)

    def check_finite(self, at: str) -> None:
        """Stop if a loss since the start was not finite (one host read: call it where the host waits
        anyway). `at`: what was about to happen, for the message."""
        if self._first_bad is None or not (first := int(self._first_bad.item())):
            return
        kept = [c.name for c in sorted(Path(self.args.output_dir).glob("checkpoint-*"),
                                       key=lambda c: int(c.name.rsplit("-", 1)[1]))]
        raise TunelabError(
            f"training stopped: the loss became {self._bad_loss.item()} at step {first} (found at step "
            f"{self.state.global_step}, before {at}); steps {first}-{self.state.global_step} are not kept"
            + (f", the last good checkpoint is {kept[-1]} in {self.args.output_dir}" if kept else "")
            + ". Lower train.lr, check the data, or use train.precision=fp32/bf16 instead of fp16."
        )

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # the loop has just read the loss: the GPU is idle, the flag and events are ready
            saving = self.control.should_save  # a checkpoint step is also a log step (CheckpointMarker)
            self.check_finite(f"writing checkpoint-{self.state.global_step}" if saving else "logging it")
            self.clock.collect()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # transformers' (private) checkpoint writer, wrapped: the one place every checkpoint passes
        self.check_finite(f"writing checkpoint-{self.state.global_step}")
        start = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.clock.host("saving", time.perf_counter() - start)

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        self.check_finite("saving the result")
        return out


class _OptimizerClock(TrainerCallback):
    """The optimizer part of a step on the trainer's StepClock: from the last micro-step's backward
    (so gradient clipping counts) to the end of optimizer.step()."""

    def __init__(self, trainer: TunelabTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._backward_end is not None:
            self.trainer.clock.span("optimizer", self.trainer._backward_end)


class AlreadyFinished(Exception):
    """The resumed checkpoint is the run's end (see ResumeGuard)."""


class ResumeGuard(TrainerCallback):
    """Stops a resumed run before its first step when its checkpoint is the run's end.

    transformers resumes a checkpoint taken at the last step (or where early stopping stopped) by
    training one step more: its loop checks max_steps only after a step, and on_train_begin clears
    the restored should_training_stop. A run killed while its adapter was written would then end
    one step further than the uninterrupted run (7 of 6). Can go once transformers checks before
    the first resumed step (5.23 does not). `stopped`: early stopping had stopped the run at the
    checkpoint (its saved TrainerControl says so)."""

    def __init__(self, stopped: bool):
        self.stopped = stopped

    def on_step_begin(self, args, state, control, **kwargs):
        if self.stopped or state.global_step >= state.max_steps:
            raise AlreadyFinished


def selection_metric(t) -> str:
    """The logged key that early stopping and the best checkpoint follow."""
    return f"eval_{t.eval_generation.key}" if t.select_on == "generation" else "eval_loss"


def training_arguments(cfg: Config, checkpoints: str, report_to: list[str]) -> TrainingArguments:
    t = cfg.train
    save_every = t.save_every or t.eval_every
    selects = t.load_best or t.early_stopping is not None
    cuda = has_cuda()
    autocast = precision(t.precision, cfg.model.dtype)
    batch, accum = t.planned(cfg.data.max_length, distributed.world_size())  # SFT's probe may replace it
    return TrainingArguments(
        output_dir=checkpoints,
        run_name=cfg.run.name,
        seed=cfg.run.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of total steps in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=autocast.bf16,
        fp16=autocast.fp16,
        use_cpu=not cuda,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_every else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if save_every else "no",
        save_steps=save_every,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=selects,
        metric_for_best_model=selection_metric(t) if selects else None,
        greater_is_better=t.select_on == "generation" if selects else None,
        train_sampling_strategy="group_by_length" if cfg.data.batching == "padding" else "random",
        length_column_name="length",
        report_to=report_to,
        include_num_input_tokens_seen="no",  # it syncs every step; TunelabTrainer counts on the host
        logging_nan_inf_filter=False,  # it syncs every step; TunelabTrainer checks the loss on the device
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},  # pinned batches copy to the GPU while it computes
        # We pass labels ourselves; keep position_ids and friends.
        remove_unused_columns=True,
        label_names=["labels"],
        disable_tqdm=False,
        **trainer_arguments(cfg),  # FSDP2 or DDP settings when several processes run
    )


def stage_arguments(config_class, cfg: Config, run_dir: Path, report_to: list[str], **extra):
    """A stage's trainer arguments for these train.* settings: TrainingArguments for SFT, or a trl
    config (DPOConfig, RewardConfig, RLOOConfig) holding exactly the same values plus the stage's
    own `extra` fields.

    trl's configs change some transformers defaults (gradient checkpointing on, bf16 on, logging
    every 10 steps); copying every field over keeps one meaning for each train.* key.
    """
    base = training_arguments(cfg, str(run_dir / "checkpoints"), report_to)
    if config_class is TrainingArguments and not extra:
        return base
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    if config_class is not TrainingArguments:
        values.update(
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            train_sampling_strategy="random",  # length grouping needs SFT's `length` column
            label_names=[],  # trl's trainers compute their own losses; there is no labels column
            include_num_input_tokens_seen="no",  # their batches have no `input_ids` to count
        )
    return config_class(**values | extra)
