"""``train.profile=true``: a torch.profiler trace of a window of optimizer steps, one per rank, under
``<run.dir>/profile/`` -- the same for every strategy (``Records`` starts it before the first step and steps it
after each optimizer step).

The window: ``train.profile_wait`` steps not recorded, one warm-up step (the profiler starts its collectors),
then ``train.profile_steps`` steps recorded; after them the profiler is stopped, the rest of the run pays nothing.
Each rank writes ``rank<R>.<id>.pt.trace.json`` (Chrome trace format: https://ui.perfetto.dev or
chrome://tracing open it; TensorBoard's profiler plugin reads the folder), with CPU ops (``aten::addmm``,
``aten::mm``...), the collectives (``gloo:all_reduce`` / ``c10d::allreduce_``; NCCL kernels on CUDA) and on a GPU
its kernels. Off (the default), nothing is imported or created and each step costs one attribute test.
"""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, folder: Path, rank: int, device: torch.device, wait: int, steps: int) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.window = wait + 1 + steps  # the step() calls after which the trace is written
        self.steps = 0
        self.profile = profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=1, active=steps, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(folder), worker_name=f"rank{rank}"),
            record_shapes=True,
        )
        self.profile.start()

    def step(self) -> bool:
        """One optimizer step done; False once the window is over and the profiler stopped."""
        self.steps += 1
        self.profile.step()
        if self.steps < self.window:
            return True
        self.stop()
        return False

    def stop(self) -> None:
        """Stop (a run shorter than the window: what was recorded so far is written)."""
        if self.profile is not None:
            self.profile.stop()
            self.profile = None
