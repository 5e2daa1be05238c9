"""Everything distmnist does to Lightning beyond its public API, here and in ``dispatch.py`` (the per-step hook
dispatch), written against Lightning 2.6.

``trainer.py`` is plain Lightning; these modules hold what it needs for speed or for a clean run and that a reader
copying the Trainer pattern can leave out. Each piece names what it relies on, falls back to stock behaviour when
that is missing, and ``tests/test_lightning_internals.py`` fails when an upgrade changes it.

* :func:`with_fast_hooks` -- the LightningModule with per-step costs removed (``_current_fx_name`` writes, the
  profiler scope of ``zero_grad``, the checks of a gradient clipping that is not configured, the dispatch of batch hooks
  nobody overrides, a device transfer of batches already on the device) and, on one GPU at 32-true, the
  step raw DDP and Fabric replay from a CUDA graph run inside ``training_step``.
* :class:`NoProfiler` -- Lightning's default PassThroughProfiler without its per-hook generator (~70 a step).
* :func:`check_step_signature_once` -- the training loop's per-step ``inspect`` of ``training_step``, done once.
* :func:`loss_undivided_without_accumulation` -- the closure's ``loss / 1`` (a kernel and an autograd node a step)
  and its copy of the loss for logging, left out.
* :func:`leave_sigterm_to_distmnist` -- Lightning's own SIGTERM handler, which would end a run with exit 0 and no
  checkpoint; and its per-step SIGTERM broadcast (a collective and a host sync), which then has nothing to share.
* :class:`RunLogger` -- a TensorBoardLogger that leaves no event file when a run is refused before it starts.
* :func:`silence_lightning_noise` -- Lightning's start-up lines that say nothing about this run.
* :func:`recount_batches` -- a checkpoint's micro-batch counters, for a resume with another accumulation.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.model_helpers import is_overridden

from distmnist.core.steps import CapturedStep, parameters, zero_grad

LIGHTNING_VERSION = "2.6"  # the version these workarounds were written and tested against


class FastHooks:
    """Per-step costs of Lightning's hooks, removed (mix in before a LightningModule)."""

    def __setattr__(self, name: str, value) -> None:
        # Lightning records the running hook's name in `_current_fx_name` before and after every hook call (~50
        # times a step); nn.Module.__setattr__'s checks for parameters/modules/buffers cost ~1.5 us each time
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        zero_grad(parameters(optimizer))  # optimizer.zero_grad() without its per-call profiler scope

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning 2.6 calls it after every backward with the Trainer's gradient_clip_val; LightningModule's own (not
        # overridden below this class) then validates the algorithm and has the precision plugin return at clip 0
        if (gradient_clip_val is None and not self.trainer.gradient_clip_val and self.fabric is None
                and super().configure_gradient_clipping.__func__ is L.LightningModule.configure_gradient_clipping):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _plain_batch_hooks(self) -> bool:
        """Neither this module nor the trainer's data module overrides on_before/after_batch_transfer, nor the data
        module transfer_batch_to_device (decided once per fit)."""
        trainer = self._trainer
        if getattr(self, "_plain_for", None) is not trainer:
            datamodule = getattr(trainer, "datamodule", None)
            hooks = ("on_before_batch_transfer", "on_after_batch_transfer", "transfer_batch_to_device")
            self._plain = not (any(is_overridden(h, self) for h in hooks[:2])
                               or (datamodule is not None and any(is_overridden(h, datamodule) for h in hooks)))
            self._plain_for = trainer
        return self._plain

    def _on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        # Lightning 2.6 routes each of the three batch hooks through _call_batch_hook (which of module and data
        # module overrides it, _current_fx_name, profiler) every step; with none overridden they hand the batch on
        if self._trainer is None or not self._plain_batch_hooks():
            return super()._on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def _apply_batch_transfer_handler(self, batch, device=None, dataloader_idx: int = 0):
        if self._trainer is None or not self._plain_batch_hooks():
            return super()._apply_batch_transfer_handler(batch, device, dataloader_idx)
        return self.transfer_batch_to_device(batch, device or self.device, dataloader_idx)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        x, y = batch
        if x.device == device:  # resident batches are there already
            return batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class GraphStep:
    """training_step replays the step of raw DDP and Fabric (``core.steps.CapturedStep``: forward, loss, backward
    and the tally captured once into a CUDA graph); Lightning's own backward and zero_grad then have nothing left
    to do, and its optimizer step reads the gradients the graph wrote -- the arithmetic of the eager step.
    Only where the step is captured (one CUDA device) at 32-true: 16-mixed scales the loss in Lightning's backward,
    bf16-mixed enters autocast outside the capture."""

    capture = True  # False: the same arrangement run eagerly (what a short last batch does; the CPU test)

    def on_train_start(self) -> None:
        super().on_train_start()  # the model is on its device and the optimizer holds its parameters

        def forward_backward(x, y):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            return logits, loss

        # the optimizer step is Lightning's, after training_step returns
        self.step_runner = CapturedStep(forward_backward, lambda: None, self.trainer.optimizers[0], self.tally,
                                        self.capture)

    def training_step(self, batch, batch_idx) -> torch.Tensor:
        return self.step_runner(*batch)

    def backward(self, loss, *args, **kwargs) -> None:
        pass  # the step runner has back-propagated

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        pass  # the step runner zeroes before its backward (in place: the graph owns the gradient buffers)


def with_fast_hooks(module_class: type, graph_step: bool = False) -> type:
    """`module_class` with :class:`FastHooks` (and :class:`GraphStep`): the same arithmetic, fewer costs."""
    bases = (GraphStep, FastHooks, module_class) if graph_step else (FastHooks, module_class)
    return type(f"Tuned{module_class.__name__}", bases, {})


class NoProfiler(PassThroughProfiler):
    """The Trainer's default profiler (it records nothing), whose ``profile(name)`` hands back one shared null context
    instead of making a ``@contextmanager`` generator: Lightning 2.6 enters ``trainer.profiler.profile(...)`` around
    every hook of every callback, module and strategy, ~70 times a step. Given as ``Trainer(profiler=NoProfiler())``
    (public API); a Lightning whose Profiler has no ``profile`` method uses its own."""

    _NOTHING = contextlib.nullcontext()

    def profile(self, action_name: str):
        return self._NOTHING


def check_step_signature_once(trainer) -> None:
    """Lightning 2.6's training loop decides before every step whether ``training_step`` takes ``batch_idx``
    (``_TrainingEpochLoop._build_kwargs`` -> ``is_param_in_hook_signature`` -> ``inspect.getfullargspec``, ~7 us a
    step on a CPU). The answer is the same for every step of a fit: it is taken from the first call and reused. A
    Lightning without ``_build_kwargs`` is left alone."""
    loop = trainer.fit_loop.epoch_loop
    build = getattr(loop, "_build_kwargs", None)
    if not callable(build):
        return
    decided: dict[type, bool] = {}  # the module's class -> passes batch_idx

    def build_kwargs(kwargs, batch, batch_idx):
        module_class = type(trainer.lightning_module)
        if module_class not in decided:
            kwargs = build(kwargs, batch, batch_idx)
            decided[module_class] = "batch_idx" in kwargs
            return kwargs
        kwargs["batch"] = batch
        if decided[module_class]:
            kwargs["batch_idx"] = batch_idx
        return kwargs

    loop._build_kwargs = build_kwargs


class UndividedLoss(ClosureResult):
    """Lightning 2.6's result of ``training_step`` in automatic optimization, without two kernels a step: the loss
    divided by ``accumulate_grad_batches`` even when that is 1 (``x / 1 == x`` exactly, but it is a division and an
    autograd node for the backward), and the loss copied for logging (a detached view: nothing writes into the loss
    in place -- the precision plugins scale it into a new tensor)."""

    @classmethod
    def from_training_step_output(cls, training_step_output, normalize: int = 1) -> ClosureResult:
        if normalize != 1 or not isinstance(training_step_output, torch.Tensor):
            return super().from_training_step_output(training_step_output, normalize)
        return cls(training_step_output)

    def _clone_loss(self) -> None:
        if self.closure_loss is not None:
            self.loss = self.closure_loss.detach()


def loss_undivided_without_accumulation(trainer) -> None:
    """The trainer's automatic optimization builds :class:`UndividedLoss` results (``output_result_cls``, an
    attribute of ``_AutomaticOptimization``); a Lightning that builds something else is left alone."""
    loop = getattr(trainer.fit_loop.epoch_loop, "automatic_optimization", None)
    if getattr(loop, "output_result_cls", None) is ClosureResult:
        loop.output_result_cls = UndividedLoss


def leave_sigterm_to_distmnist(trainer) -> None:
    """distmnist's StopRequest (core.stopping) owns SIGTERM/SIGUSR1/SIGINT from before fit to the end: the ranks
    agree on a step, write a checkpoint and exit 75 (130 after Ctrl-C). Lightning 2.6 leaves SIGINT alone but catches
    the KeyboardInterrupt a Ctrl-C raises inside fit (``trainer.call._call_and_handle_interrupt``: its own "Detected
    KeyboardInterrupt" line, on_exception, SIGINT ignored from then on, ``sys.exit(1)``, no checkpoint); with
    SIGINT taken over before fit no KeyboardInterrupt is raised, and the Trainer stops as raw DDP and Fabric do
    (the stop's exception passes through Lightning's on_exception like any other). Its SIGTERM handler, registered
    when fit starts (SignalConnector.register_signal_handlers), would make a SIGTERM raise SIGTERMException at the
    next step and end the run with exit 0 and no checkpoint. So its registration is skipped, and so is the broadcast of
    its (now always unset) flag that it runs before every training step with several processes (`.item()`: a host
    sync and a collective per step). A Lightning without these methods is left alone."""
    connector = getattr(trainer, "_signal_connector", None)
    if callable(getattr(connector, "register_signal_handlers", None)):
        connector.register_signal_handlers = lambda: None
    loop = trainer.fit_loop.epoch_loop
    if callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
        loop._broadcast_sigterm_tensor = lambda: None


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, except that a run stopped before it started (missing data, say) leaves no
    event file behind: finalize() does not create the writer just to flush it (`_experiment` is None until the
    first use; without that attribute, stock behaviour)."""

    def finalize(self, status: str) -> None:
        if getattr(self, "_experiment", True) is not None:
            super().finalize(status)


def silence_lightning_noise(quiet: bool) -> None:
    """Lightning's lines that say nothing about this run; with train.quiet its banner too ("GPU available...")."""
    # 2.6 advertises a cloud logger on every start and trips a torch deprecation in its own pytree code
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # its hint about srun is moot: the cluster environment is chosen explicitly (adapters.cluster_environment)
    warnings.filterwarnings("ignore", message=r"The `srun` command is available")
    # mid-epoch resume is handled (RunCheckpoints.on_load_checkpoint positions the loader), unlike what it fears
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # FastHooks.transfer_batch_to_device is meant to replace the data module's (which it does not override)
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`")
    if quiet:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


BATCH_PROGRESS = ("loops", "fit_loop", "epoch_loop.batch_progress")  # where Lightning 2.6 keeps them


def recount_batches(ckpt: dict, was: int, now: int) -> None:
    """Lightning's training loop counts micro-batches (``batch_progress``): it steps the optimizer when the epoch's
    count is a multiple of ``accumulate_grad_batches`` and ends the epoch at ``num_training_batches``. A run saved
    with accumulation `was` and resumed with `now` (another number of processes, the same global batch) has done
    the same optimizer steps: its counts become steps x `now` (checkpoints are only written after an optimizer step;
    a counter Lightning has not advanced yet for the batch keeps its distance to ``ready``).
    Nothing happens when the counters are not where Lightning 2.6 keeps them (stock behaviour)."""
    if was == now:
        return
    progress = ckpt
    for key in BATCH_PROGRESS:
        progress = progress.get(key) if isinstance(progress, dict) else None
    if not isinstance(progress, dict):
        return
    for part in ("total", "current"):
        counts = progress.get(part)
        if isinstance(counts, dict) and isinstance(counts.get("ready"), int):
            steps = counts["ready"] // was
            for name, value in counts.items():
                if isinstance(value, int):
                    counts[name] = value + steps * (now - was)
