"""Raw PyTorch DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=4 -m distmnist.ddp [-c CONFIG] [section.key=value ...]
    python -m distmnist.ddp ...            # one process, no process group

The lifecycle reads top to bottom: process group, data, model, DDP wrap, optimizer, then
``for epoch: set_epoch; for batch: step``, checkpoint, evaluate, record. What is shared with ``fabric.py`` and
``trainer.py`` (data order, model, step runner, metrics, records, checkpoint policy) lives in ``distmnist.core``
and is called by name; ``diff ddp.py fabric.py`` shows only what differs between the two APIs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distmnist.core import checkpoint, data, dist, parallel
from distmnist.core.args import strategy_main
from distmnist.core.config import Config
from distmnist.core.errors import exit_process
from distmnist.core.metrics import EvalMetrics, TrainTally, all_evaluate
from distmnist.core.model import build_model, build_optimizer, build_scheduler
from distmnist.core.precision import autocast_factory, grad_scaler
from distmnist.core.records import Records
from distmnist.core.run import RunDir
from distmnist.core.state import TrainState
from distmnist.core.steps import CapturedStep, capture_applies
from distmnist.core.stopping import CheckpointAndStopPolicy

NAME = "ddp"


def train(cfg: Config) -> dict:
    env = dist.read_env(cfg.train.accelerator)  # rank, world size, device from torchrun / SLURM
    autocast = autocast_factory(cfg.train.precision, env.device)
    run = RunDir(cfg, NAME, env)
    resume_from = run.checkpoint_to_resume()  # refuses a run dir not ours (every rank, nothing written)
    with dist.process_group(env, cfg.dist.timeout_s, cfg.dist.startup_timeout_s):
        records = Records(run)
        data.all_ensure_available(cfg.data, env)
        split = data.load_split(cfg.data, train=True)
        # one item per optimizer step: data-parallel rank r takes perm[r::D] of the epoch's order, batch_size x
        # accumulation at a time (the ranks of a tensor-parallel group the same)
        train_batches = data.train_batches(cfg, env, split)
        accumulate = run.batching.accumulate  # micro-batches per optimizer step (train.accumulate_grad_batches)
        eval_batches = data.eval_batches(cfg, env)

        model = build_model(cfg.model.hidden, cfg.seed).to(env.device)
        # one process needs no DDP wrapper: same arithmetic (averaging over 1 rank), no bucket overhead
        net = model
        if run.layout.on_mesh:  # fsdp/hsdp or train.tp_size > 1: TP over the mesh's tp, then FSDP2 over its dp dims
            mesh = parallel.mesh(env, run.layout)  # (dp_replicate, dp_shard, tp)
            net = model = parallel.parallelize(model, *parallel.submeshes(mesh, run.layout), cfg.train.precision)
        elif env.world_size > 1:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=device_ids)
            parallel.settle_buckets(net)  # the gradient buckets laid out once: every step sums alike (resume exact)
        optimizer = build_optimizer(cfg.optim, model.parameters())  # FSDP: over this rank's shards
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.epochs * len(train_batches))
        scaler = grad_scaler(cfg.train.precision, env.device)  # active for 16-mixed only

        def forward_backward(x, y):
            with autocast():
                logits = net(x)
                loss = F.cross_entropy(logits, y)
            # the mean over the step's samples, summed over micro-batches (no `/ 1`: one autograd node less a step)
            scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
            return logits, loss

        def optimizer_step():
            scaler.step(optimizer)
            scaler.update()

        tally = TrainTally(env.device, counted=run.layout.tp_rank(env.rank) == 0)  # a TP group's samples once

        def train_step(x, y):
            optimizer.zero_grad(set_to_none=True)
            micro = data.micro_batches(x, y, accumulate)  # the step's samples, `accumulate` micro-batches
            for i, (xm, ym) in enumerate(micro):
                # no gradient all-reduce (DDP) / reduce-scatter (FSDP) but on the last micro-batch
                with parallel.no_sync(net, enabled=i < len(micro) - 1):
                    logits, loss = forward_backward(xm, ym)
                tally.update(logits, ym, loss)
            optimizer_step()
            return loss

        if capture_applies(cfg, env):  # one GPU, train.cuda_graphs: the same step replayed from a CUDA graph
            train_step = CapturedStep(forward_backward, optimizer_step, optimizer, tally)
        stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}

        policy = CheckpointAndStopPolicy(cfg, env.device, records)  # when to checkpoint, when to stop

        def all_save_checkpoint(state: TrainState):
            state.tally = tally.all_state()  # a collective: every rank is here at the same step
            policy.all_check_finite(state, model)  # diverged: stop (exit 3) before writing anything non-finite
            path = run.checkpoint_path(state.global_step)
            # rank 0 writes (DDP), or every rank its shards (FSDP); all wait
            checkpoint.all_save_state(path, {**stateful, "distmnist": records.checkpoint_meta(state)}, env.is_zero)
            run.prune(state.global_step)
            return path

        state = TrainState()
        if (path := run.all_agree(resume_from)) is not None:  # rank 0's choice, loaded by every rank
            record = checkpoint.all_load_state(path, stateful)["distmnist"]  # whose run, position, history
            state = TrainState.from_checkpoint(record)
            records.continue_from(record, state)
            records.say(f"resuming from {path} (epoch {state.epoch + 1}, step {state.global_step})", always=True)
        tally.restore(state.tally, env.is_zero)
        records.start(split, fresh=path is None)
        records.watch(model, optimizer)  # per-rank memory of the training state, in each epoch's record

        metrics = EvalMetrics(keep_wrong=32 if env.is_zero else 0).to(env.device)
        policy.install()  # SIGTERM/SIGUSR1/SIGINT (Ctrl-C) -> checkpoint, exit 75 / 130
        records.begin_training(state)
        for epoch in range(state.epoch, cfg.train.epochs):
            train_batches.set_epoch(epoch)
            train_batches.skip(state.step_in_epoch)
            records.begin_epoch(state)
            for x, y in records.progress(train_batches, state):
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                loss = train_step(x, y)
                state.advance()
                records.log_step(state.global_step, loss, optimizer.param_groups[0]["lr"])
                scheduler.step()
                if policy.all_checkpoint_due(state, len(train_batches), tally):
                    path = all_save_checkpoint(state)
                    policy.stop_if_signalled(state, path)
            train_s = records.epoch_seconds(sync=True)
            val = all_evaluate(model, eval_batches, metrics, autocast, env.device)
            records.end_epoch(state, tally.all_compute(), val, train_s)
            state.next_epoch()
            all_save_checkpoint(state)
        policy.uninstall()  # not if training stopped: a late SIGTERM must not kill the exit

        summary = records.all_finish(model, state)
        dist.barrier()
        return summary


main = strategy_main(NAME, train)

if __name__ == "__main__":
    exit_process(main())  # os._exit once all is written: the interpreter's teardown can abort (core/errors.py)
