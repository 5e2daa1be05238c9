"""The CUDA-graph step: the eager step of ``ddp.py`` / ``fabric.py`` (and the Trainer's one-GPU speed-up),
captured once and replayed -- the same arithmetic.

The strategy files show the eager step inline: ``zero_grad``, each micro-batch's forward, loss and backward (all
but the last inside ``no_sync``: no gradient all-reduce), the training tally, the optimizer step. Where capture
applies (:func:`capture_applies`: ``train.cuda_graphs``, CUDA, one process, no accumulation) they hand the same
``forward_backward(x, y) -> (logits, loss)`` and ``optimizer_step()`` to :class:`CapturedStep` instead:

* the first ``WARMUP_STEPS`` steps run eagerly on a side stream (lazy CUDA/cuBLAS/optimizer-state
  initialisation);
* then forward, loss, backward and the tally update are captured once into a CUDA graph and replayed for every
  full-size batch. The gradients the graph writes live at fixed addresses, so the optimizer step -- left eager,
  exactly the code the eager path runs, with the learning rate of the schedule -- reads them as it would after an
  eager backward;
* batches of another size (the short last batch of an epoch) run eagerly, the gradients zeroed in place.

Capture is not used with several processes: DDP's gradient all-reduce inside a graph needs NCCL, static graphs
and bucket settings this package does not pin down (see docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distmnist.core.config import Config, batching
from distmnist.core.dist import DistEnv
from distmnist.core.metrics import TrainTally

WARMUP_STEPS = 3


def capture_applies(cfg: Config, env: DistEnv) -> bool:
    """Where the step is replayed from a CUDA graph: ``train.cuda_graphs``, a CUDA device, one process, DDP (FSDP's
    all-gathers and its hooks are not captured), no gradient accumulation."""
    return (
        cfg.train.cuda_graphs and env.device.type == "cuda" and env.world_size == 1 and cfg.train.parallel == "ddp"
        and batching(cfg, env.world_size).accumulate == 1  # one process: world size = data-parallel size
    )


def parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def zero_grad(params: list[torch.Tensor], set_to_none: bool = True) -> None:
    """What optimizer.zero_grad does, without its per-call profiler scope (measurable at ~1 ms a step on a GPU)."""
    for p in params:
        if set_to_none:
            p.grad = None
        elif p.grad is not None:
            p.grad.zero_()


class CapturedStep:
    """``step(x, y) -> loss``: the eager step's forward/backward and tally replayed from a CUDA graph (one process,
    one micro-batch per step), then ``optimizer_step()`` eagerly."""

    def __init__(
        self,
        forward_backward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        optimizer_step: Callable[[], None],
        optimizer: torch.optim.Optimizer,
        tally: TrainTally,
        capture: bool = True,
    ) -> None:
        self.forward_backward, self.optimizer_step = forward_backward, optimizer_step
        self.params = parameters(optimizer)
        self.grads: list[torch.Tensor] = []  # the graph's gradient buffers, once captured
        self.tally = tally
        self.capture = capture  # False: the same arrangement run eagerly (what a short last batch does)
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side: torch.cuda.Stream | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on (x, y); returns the loss tensor (no host synchronisation)."""
        self.steps += 1
        if not self.capture:
            return self._eager(x, y)
        if self.graph is None and self.steps <= WARMUP_STEPS:
            return self._warmup(x, y)
        if self.graph is None:
            self._capture(x, y)
        if x.shape != self.x.shape:
            return self._eager(x, y)
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is not g:  # someone released the gradients (Lightning does before each validation)
                p.grad = g  # the graph has just rewritten the buffer: point the parameter back at it
        self.optimizer_step()
        return self.loss

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # with a graph, its gradient buffers must stay where they are: zeroed in place (0 + g == g exactly)
        zero_grad(self.params, set_to_none=self.graph is None)
        logits, loss = self.forward_backward(x, y)
        self.tally.update(logits, y, loss)
        for p, g in zip(self.params, self.grads, strict=False):
            if p.grad is not g:  # autograd handed over a new tensor: back into the graph's buffer
                g.copy_(p.grad)
                p.grad = g
        self.optimizer_step()
        return loss
    def _warmup(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.side is None:
            self.side = torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss = self._eager(x, y)
        torch.cuda.current_stream().wait_stream(self.side)
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        # backward inside the capture allocates the gradients in the graph's memory pool
        zero_grad(self.params, set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may call CUDA during the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            logits, self.loss = self.forward_backward(self.x, self.y)
            self.tally.update(logits, self.y, self.loss, defer=False)  # replayed: added up in the graph
        self.grads = [p.grad for p in self.params]
