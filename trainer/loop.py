"""The training loop: plain torch over a PEFT model, with exact resume, status.json and clean stopping.

One optimizer step consumes ``grad_accum x world_size`` micro-batches of the epoch's order (never crossing an
epoch's end); under ``torchrun`` each rank takes every ``world_size``-th micro-batch and the adapter's
gradients (MBs) are summed over ranks with one all-reduce each, so no DDP wrapper is needed and the prefix
forward (which calls the base directly) is covered too. Only rank 0 writes files.

Stopping: ``stop`` (an Event set by the SIGTERM handler) or a ``RUN_DIR/STOP`` file is checked after every
step (under torchrun the ranks agree on it, so that all stop at the same step); the run then writes a
checkpoint, marks itself ``stopped``, removes the STOP file it honoured and returns normally.

Rank 0 holds ``RUN_DIR/trainer.lock`` (runlock.py) for the whole run: a second trainer on the same directory
is refused, and the daemon tells a live run from a dead one by it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..server.model import pick_device
from . import checkpoint as ckpt
from . import data as data_mod
from . import model as model_mod
from . import resume as resume_mod
from . import runlock
from .config import TrainConfig
from .resume import METRICS_FILE
from .status import STOP_FILE, GpuMonitor, StatusWriter, read_status

log = logging.getLogger("adapterd.trainer")
FINAL_DIR = "final"


class StopRequested(Exception):
    """Internal: leave the loop after a stop request (never escapes ``train``)."""


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Learning-rate multiplier per step: linear warm-up to 1, then linear / cosine decay to 0, or constant."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        span = max(total_steps - cfg.warmup_steps, 1)
        done = min((step - cfg.warmup_steps) / span, 1.0)
        return 1.0 - done if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return factor


def _dist() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    # Before the group exists: this module's functions take ``group=group.WORLD`` as a default, which binds the
    # group itself where the module is first imported after ``init_process_group`` (transformers imports it,
    # through torch's FSDP, when it first reads a model's config). Then ``destroy_process_group`` leaves the
    # group alive, its gloo threads run into the interpreter's exit, and one freeing a finished collective's
    # tensors there aborts the rank (SIGABRT, "terminate called without an active exception"; bench/NOTES.md).
    # Imported first, the default is None and the group ends, its threads joined, in destroy_process_group.
    import torch.distributed.nn  # noqa: F401

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _evaluate(peft_model: Any, examples: list[data_mod.Example], cfg: TrainConfig, pad_id: int,
              device: torch.device) -> float:
    """Mean of per-batch mean token losses over the eval split (no dropout, no RNG draws)."""
    peft_model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(examples), cfg.batch_size):
            batch = {k: v.to(device) for k, v in data_mod.collate(examples[i:i + cfg.batch_size], pad_id).items()}
            losses.append(float(model_mod.forward_loss(peft_model, batch, cfg)[0]))
    peft_model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, *, stop: threading.Event | None = None, progress: bool = False,
          started_unix: float | None = None) -> dict[str, Any]:
    """Run (or resume) one training run to its end or to a stop request. Returns the final status as a dict.
    Failures are written to status.json (state ``failed``, ``error``) and then raised; a ``--resume`` of a
    completed run returns its status and touches nothing. ``started_unix``: when this trainer started (a
    STOP file older than that is stale); now when not given. ``runlock.RunBusy`` (nothing written) when
    another trainer holds the run directory."""
    cfg.validate()
    done = resume_mod.completed_run(cfg)
    if done is not None:
        resume_mod.export_missing(cfg, done)
        return done
    if cfg.resume:  # before the lock and status.json: a refused resume writes nothing
        resume_mod.check_resume_config(cfg.run_dir, cfg)
    started_unix = time.time() if started_unix is None else started_unix
    rank, world = _dist()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    lock = runlock.acquire(cfg.run_dir) if rank == 0 else None
    try:
        return _train_locked(cfg, stop or threading.Event(), progress, started_unix, rank, world)
    finally:
        if lock is not None:
            runlock.release(lock)


def _train_locked(cfg: TrainConfig, stop: threading.Event, progress: bool, started_unix: float, rank: int,
                  world: int) -> dict[str, Any]:
    run_dir = cfg.run_dir
    main = rank == 0
    handler = _setup_logging(run_dir) if main else None
    if main:
        resume_mod.clear_stale_stop(run_dir, started_unix)
    device = pick_device()
    gpu = GpuMonitor([device.index or 0] if device.type == "cuda" else [])
    status = StatusWriter(run_dir, cfg.method, gpu)
    if cfg.resume:
        status.resume_from(read_status(run_dir))
    if main:
        status.update(state="pending")
    finished = False
    try:
        result = _run(cfg, run_dir, device, status, stop, progress, rank, world)
        finished = True
    except Exception as exc:
        log.exception("training failed")
        if main:
            status.update(state="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if world > 1:
            import torch.distributed as dist

            if finished:  # wait for rank 0's last checkpoint: a rank leaving early aborts in gloo's teardown
                dist.barrier()
            dist.destroy_process_group()
    return result


def _run(cfg: TrainConfig, run_dir: Path, device: torch.device, status: StatusWriter, stop: threading.Event,
         progress: bool, rank: int, world: int) -> dict[str, Any]:
    main = rank == 0
    write = status.update if main else (lambda **_: None)
    if main:
        ckpt.remove_stale(run_dir)
        resume_mod.write_config(run_dir, cfg)
    log.info("run %s: %s on %s (%s), data %s", run_dir.name, cfg.method, cfg.base, cfg.quantization, cfg.data)

    records = data_mod.load_records(cfg.data, skip_malformed=cfg.skip_malformed)
    tokenizer = model_mod.load_tokenizer(cfg.base)
    data_mod.check_prompt_format(tokenizer, cfg.prompt_format)
    examples = data_mod.tokenize_all(records, tokenizer, cfg.context_length, skip_malformed=cfg.skip_malformed,
                                     prompt_format=cfg.prompt_format)
    for index, reason in records.skipped:
        log.warning("skipped %s", reason if reason.startswith("record") else f"record {index}: {reason}")
    train_set, eval_set = data_mod.split_eval(examples, cfg.eval_split, cfg.seed)
    log.info("%d records, %d skipped; %d train, %d eval", len(records.records) + len(records.skipped),
             len(records.skipped), len(train_set), len(eval_set))

    base = model_mod.load_base(cfg, device)
    if cfg.quantization == "int8" and cfg.int8_compute == "dequant":
        log.info("int8 compute: dequant (%d int8 layers)", model_mod.use_dequant_int8(base))
    peft_model = model_mod.make_peft_model(base, cfg)
    if model_mod.checkpointing_wanted(cfg, device):
        model_mod.enable_checkpointing(peft_model, cfg)
    if cfg.method == "ptuning-v2" and not model_mod.check_prefix_reaches_layers(peft_model, cfg, device):
        if not model_mod.checkpointing_wanted(cfg, device):
            raise RuntimeError("the prefix key/values do not reach the decoder layers with this transformers "
                               "version; prefix tuning would learn nothing")
        log.warning("this transformers version drops the cache under gradient checkpointing: "
                    "P-Tuning v2 runs without checkpointing (more activation memory)")
        with torch.no_grad():
            peft_model.get_base_model().gradient_checkpointing_disable()
        if not model_mod.check_prefix_reaches_layers(peft_model, cfg, device):
            raise RuntimeError("the prefix key/values do not reach the decoder layers")
    model_mod.training_kernels(peft_model, cfg, device)  # logs which (liger, or off and why) unless off
    head, head_name = model_mod.loss_head(peft_model, cfg, device)
    log.info("loss: %s", head_name)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    log.info("trainable parameters: %d", sum(p.numel() for p in params))

    per_step = cfg.grad_accum * world
    n_batches = math.ceil(len(train_set) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / per_step)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))

    step, pos = 0, ckpt.DataPosition()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.resume:
        source = ckpt.find_checkpoint(run_dir, cfg.resume)
        ckpt.load_adapter_weights(peft_model, source)
        state = ckpt.load_trainer_state(source)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, pos = int(state["step"]), ckpt.DataPosition(**state["position"])
        status.status.last_checkpoint = str(source)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", source, step, pos.epoch,
                 pos.batch_in_epoch)
    if main:
        resume_mod.truncate_metrics(run_dir, step)
    write(state="running", step=step, total_steps=total, skipped_records=len(records.skipped),
          epoch=pos.epoch + pos.batch_in_epoch / n_batches, error="")

    pad_id = tokenizer.pad_token_id
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
    order = data_mod.epoch_order(len(train_set), cfg.seed, pos.epoch)

    def save() -> Path | None:
        if not main:
            return None
        extra = {"loss": status.status.loss, "epoch": pos.epoch + pos.batch_in_epoch / n_batches}
        path = ckpt.save_checkpoint(run_dir, step, peft_model, optimizer, scheduler, pos, extra, cfg.keep_last,
                                    tokenizer=tokenizer, prompt_format=cfg.prompt_format)
        log.info("saved %s", path)
        write(last_checkpoint=str(path))
        return path

    saved_at = step if cfg.resume else -1
    try:
        while step < total:
            if _stop_wanted(run_dir, stop, world, device):
                raise StopRequested
            if pos.batch_in_epoch >= n_batches:
                pos = ckpt.DataPosition(pos.epoch + 1, 0)
                order = data_mod.epoch_order(len(train_set), cfg.seed, pos.epoch)
            first = pos.batch_in_epoch
            last = min(first + per_step, n_batches)
            mine = [b for b in range(first, last) if (b - first) % world == rank]
            loss_sum, tokens = 0.0, 0
            for b in mine:
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                batch = data_mod.collate([train_set[i] for i in idx], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, _ = model_mod.forward_loss(peft_model, batch, cfg, head)
                (loss / (last - first)).backward()
                loss_sum += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
            step_loss = loss_sum / max(len(mine), 1)
            if world > 1:
                step_loss, tokens = _all_reduce_grads(params, step_loss * len(mine), tokens, last - first)
            if not math.isfinite(step_loss):  # the step would write NaN into the adapter: stop here, say why
                raise ckpt.NonFiniteAdapter(f"the loss is {step_loss} at step {step + 1}: lower the learning rate "
                                            "or lora_alpha, or keep gradient clipping on")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pos = ckpt.DataPosition(pos.epoch, last)
            epoch = pos.epoch + pos.batch_in_epoch / n_batches
            if main:
                status.record_step(step, step_loss, tokens)
                with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": step, "loss": step_loss, "lr": lr, "epoch": epoch}) + "\n")
            if step % cfg.log_every == 0 or step == total:
                log.info("step %d/%d epoch %.2f loss %.4f lr %.3g", step, total, epoch, step_loss, lr)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
            eval_due = bool(eval_set) and ((cfg.eval_steps and step % cfg.eval_steps == 0) or
                                           (not cfg.eval_steps and step % cfg.save_steps == 0) or step == total)
            if eval_due:
                eval_loss = _evaluate(peft_model, eval_set, cfg, pad_id, device)
                log.info("step %d eval loss %.4f", step, eval_loss)
                write(eval_loss=eval_loss)
            write(step=step, epoch=epoch, learning_rate=lr)
            if step % cfg.save_steps == 0 or step == total:
                save()
                saved_at = step
    except StopRequested:
        if step > 0 and saved_at != step:
            save()
        write(state="stopped", step=step)
        if main:  # honoured: a later resume must not stop at once on it (after "stopped" is on disk)
            (run_dir / STOP_FILE).unlink(missing_ok=True)
        log.info("stopped at step %d", step)
        return dict(vars(status.status))
    finally:
        if bar is not None:
            bar.close()

    if main:
        last_ckpt = ckpt.find_checkpoint(run_dir, "latest")
        final = run_dir / FINAL_DIR
        if not final.exists():
            ckpt.export_adapter(last_ckpt, final)
        exported = ""
        if cfg.export_adapter:
            exported = str(ckpt.export_adapter(last_ckpt, Path(cfg.export_adapter)))
            log.info("exported the final adapter to %s", exported)
        write(state="completed", final_adapter=str(final.resolve()), exported_to=exported)
        log.info("completed %d steps; final adapter %s", step, final)
    return dict(vars(status.status))


def _stop_wanted(run_dir: Path, stop: threading.Event, world: int, device: torch.device) -> bool:
    """A stop request (signal or STOP file) seen by any rank; under torchrun every rank gets the same answer,
    since a rank that stops while another steps would leave that one waiting in its all-reduce."""
    wanted = stop.is_set() or (run_dir / STOP_FILE).exists()
    if world <= 1:
        return wanted
    import torch.distributed as dist

    flag = torch.tensor([1.0 if wanted else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _all_reduce_grads(params: list[torch.Tensor], loss_sum: float, tokens: int,
                      n_micro: int) -> tuple[float, int]:
    """Sum the adapter gradients over ranks (each rank already divided by the step's micro-batch count),
    and the step's loss and token count."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    stats = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64,
                         device=params[0].device)
    dist.all_reduce(stats)
    return float(stats[0]) / n_micro, int(stats[1])
