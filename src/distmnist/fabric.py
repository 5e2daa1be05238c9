"""Lightning Fabric: our own loop; Fabric takes care of devices, DDP, precision and launching.

    torchrun --nproc_per_node=4 -m distmnist.fabric [-c CONFIG] [section.key=value ...]
    python -m distmnist.fabric ...          # one process

The same lifecycle as ``ddp.py``, line for line, in Fabric's API: ``Fabric(accelerator, strategy, devices,
num_nodes, precision)``, ``fabric.launch()``, ``fabric.setup_module(model)`` then ``fabric.setup_optimizers``
(the model first: FSDP shards it, the optimizer takes the shards), ``fabric.autocast()`` + ``fabric.backward(loss)``,
``fabric.save`` / ``fabric.load``. ``diff ddp.py fabric.py`` shows only that.
"""

from __future__ import annotations

from datetime import timedelta

import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

from distmnist.core import data, dist, parallel, peers
from distmnist.core.args import strategy_main
from distmnist.core.config import Config
from distmnist.core.errors import exit_process
from distmnist.core.metrics import EvalMetrics, TrainTally, all_evaluate
from distmnist.core.model import build_model, build_optimizer, build_scheduler
from distmnist.core.precision import check_precision
from distmnist.core.records import Records
from distmnist.core.run import RunDir
from distmnist.core.state import TrainState
from distmnist.core.steps import CapturedStep, capture_applies
from distmnist.core.stopping import CheckpointAndStopPolicy
from distmnist.lightning import adapters

NAME = "fabric"


def train(cfg: Config) -> dict:
    env = dist.read_env(cfg.train.accelerator)  # rank, world size, device from torchrun / SLURM
    check_precision(cfg.train.precision, env.device)
    run = RunDir(cfg, NAME, env)
    resume_from = run.checkpoint_to_resume()  # refuses a run dir not ours (every rank, nothing written)
    strategy = "auto"
    if env.world_size > 1:
        strategy = DDPStrategy(timeout=timedelta(seconds=cfg.dist.timeout_s))
    plugins = [adapters.checkpoint_io(), adapters.cluster_environment(env)]
    if run.layout.on_mesh:  # FSDP2 / TP: Lightning's ModelParallelStrategy with the layout of core.parallel
        dp_size, tp_size = adapters.model_parallel_sizes(run.layout)  # or one line: hsdp, ddp x tp
        strategy = adapters.sharded_strategy(ModelParallelStrategy)(
            parallelize_fn=adapters.parallelize_fn(cfg.train.precision, cfg.train.parallel),
            data_parallel_size=dp_size, tensor_parallel_size=tp_size, timeout=timedelta(seconds=cfg.dist.timeout_s),
        )
        plugins = [adapters.cluster_environment(env)]  # it takes no CheckpointIO: checkpoints are DCP folders
    fabric = Fabric(
        accelerator=env.device.type,
        devices=env.local_world_size,
        num_nodes=env.num_nodes,
        strategy=strategy,
        precision=cfg.train.precision,
        plugins=plugins,
    )
    dist.init_process_group(env, cfg.dist.timeout_s, cfg.dist.startup_timeout_s)  # every rank in, or who is missing
    fabric.launch()  # uses the process group that is up
    try:
        records = Records(run)
        data.all_ensure_available(cfg.data, env)
        split = data.load_split(cfg.data, train=True)
        # one item per optimizer step: data-parallel rank r takes perm[r::D] of the epoch's order, batch_size x
        # accumulation at a time (the ranks of a tensor-parallel group the same)
        train_batches = data.train_batches(cfg, env, split)
        accumulate = run.batching.accumulate  # micro-batches per optimizer step (train.accumulate_grad_batches)
        eval_batches = data.eval_batches(cfg, env)

        model = build_model(cfg.model.hidden, cfg.seed)
        net = fabric.setup_module(model)  # moves `model` to the device, wraps it in DDP (or shards it in place: FSDP)
        parallel.settle_buckets(net)  # the gradient buckets laid out once: every step sums alike (resume exact)
        optimizer = build_optimizer(cfg.optim, model.parameters())  # FSDP: over this rank's shards
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.epochs * len(train_batches))
        optimizer = fabric.setup_optimizers(optimizer)
        scaler = getattr(fabric.strategy.precision, "scaler", None)  # 16-mixed: the precision plugin's GradScaler

        def forward_backward(x, y):
            with fabric.autocast():
                logits = net(x)
                loss = F.cross_entropy(logits, y)
            # the mean over the step's samples, summed over micro-batches (no `/ 1`: one autograd node less a step)
            fabric.backward(loss / accumulate if accumulate > 1 else loss)
            return logits, loss

        tally = TrainTally(env.device, counted=run.layout.tp_rank(env.rank) == 0)  # a TP group's samples once

        def train_step(x, y):
            optimizer.zero_grad(set_to_none=True)
            micro = data.micro_batches(x, y, accumulate)  # the step's samples, `accumulate` micro-batches
            for i, (xm, ym) in enumerate(micro):
                # no gradient all-reduce (DDP) / reduce-scatter (FSDP) but on the last micro-batch
                with fabric.no_backward_sync(net, enabled=i < len(micro) - 1):
                    logits, loss = forward_backward(xm, ym)
                tally.update(logits, ym, loss)
            optimizer.step()
            return loss

        if capture_applies(cfg, env):  # one GPU, train.cuda_graphs: the same step replayed from a CUDA graph
            train_step = CapturedStep(forward_backward, optimizer.step, optimizer, tally)
        stateful = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
        if scaler is not None:
            stateful["scaler"] = scaler

        policy = CheckpointAndStopPolicy(cfg, env.device, records)  # when to checkpoint, when to stop

        def all_save_checkpoint(state: TrainState):
            state.tally = tally.all_state()  # a collective: every rank is here at the same step
            policy.all_check_finite(state, model)  # diverged: stop (exit 3) before writing anything non-finite
            path = run.checkpoint_path(state.global_step)
            # rank 0 writes (FSDP: each rank its shards), all wait
            fabric.save(path, {**stateful, "distmnist": records.checkpoint_meta(state)})
            run.prune(state.global_step)
            return path

        state = TrainState()
        if (path := run.all_agree(resume_from)) is not None:  # rank 0's choice, loaded by every rank
            record = fabric.load(path, stateful)["distmnist"]  # whose run, position, history
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
            val = all_evaluate(model, eval_batches, metrics, fabric.autocast, env.device)
            records.end_epoch(state, tally.all_compute(), val, train_s)
            state.next_epoch()
            all_save_checkpoint(state)
        policy.uninstall()  # not if training stopped: a late SIGTERM must not kill the exit

        summary = records.all_finish(model, state)
        fabric.barrier()
        return summary
    except BaseException as err:  # a known error told to the other ranks, a lost collective named by their word
        peers.raise_told(err)
    finally:
        dist.destroy_process_group()


main = strategy_main(NAME, train)

if __name__ == "__main__":
    exit_process(main())  # os._exit once all is written: the interpreter's teardown can abort (core/errors.py)
