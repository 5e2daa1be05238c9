"""What distmnist/lightning/ (internals.py, and adapters.sharded_strategy) relies on in Lightning beyond its public
API: these fail when an upgrade changes it. And that distmnist.core needs no Lightning at all.

(That the captured-step arrangement computes what raw DDP computes is test_distributed.py's
test_trainer_step_inside_training_step_equals_raw_ddp, and that the sharded strategies compute what raw FSDP2
computes is test_fsdp.py's; here, the names, hooks and checkpoint keys they depend on.)
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import lightning as L
import pytest
import torch
import torch.distributed as tdist
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import ModelParallelStrategy
from procs import child_env, ok

from distmnist.core import checkpoint
from distmnist.core.config import load_config
from distmnist.lightning import adapters, dispatch, internals
from distmnist.trainer import LitClassifier


def test_lightning_is_the_version_the_workarounds_were_written_for():
    major_minor = ".".join(L.__version__.split(".")[:2])
    assert major_minor == internals.LIGHTNING_VERSION, (
        f"Lightning {L.__version__}: re-check distmnist/lightning/ against it, then update LIGHTNING_VERSION"
    )


CORE_IMPORTS = """
import importlib, pkgutil, sys
import distmnist.core
for module in pkgutil.iter_modules(distmnist.core.__path__):
    importlib.import_module(f"distmnist.core.{module.name}")
LIGHTNING = ("lightning", "lightning_fabric", "pytorch_lightning")
print(sorted(name for name in sys.modules if name.split(".")[0] in LIGHTNING))
"""


def test_the_core_imports_no_lightning():
    """Lightning-specific code lives in distmnist/lightning/: every module of distmnist.core imports without it (a
    fresh interpreter: this one has Lightning loaded)."""
    proc = ok(subprocess.run([sys.executable, "-c", CORE_IMPORTS], env=child_env(), capture_output=True, text=True,
                             timeout=120))
    assert proc.stdout.strip() == "[]", proc.stdout


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_sigterm_broadcast_is_still_a_method_of_the_epoch_loop_and_is_skipped():
    trainer = quiet_trainer()
    loop = trainer.fit_loop.epoch_loop
    assert callable(getattr(loop, "_broadcast_sigterm_tensor", None))
    assert callable(getattr(trainer._signal_connector, "register_signal_handlers", None))
    internals.leave_sigterm_to_distmnist(trainer)
    assert loop._broadcast_sigterm_tensor() is None


@pytest.mark.parametrize("left_to_distmnist", [True, False])
def test_the_sigterm_handler_inside_fit_is_the_one_installed_before(left_to_distmnist):
    """Lightning installs its own SIGTERM handler when fit starts (a SIGTERM then ends the run with exit 0 and no
    checkpoint); left to distmnist, the handler in force inside fit is the one installed before it."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen = []

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(signal.getsignal(signal.SIGTERM))

    def ours(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[Probe()])
        if left_to_distmnist:
            internals.leave_sigterm_to_distmnist(trainer)
        trainer.fit(BoringModel())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (seen == [ours]) == left_to_distmnist, seen


def test_the_sigint_handler_inside_fit_is_the_one_installed_before():
    """Ctrl-C: Lightning 2.6 leaves SIGINT's handler alone during fit, so distmnist's (installed before fit)
    records the Ctrl-C and the agreed stop follows, as in raw DDP and Fabric."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(signal.getsignal(signal.SIGINT))

    def ours(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, ours)
    try:
        trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[Probe()])
        internals.leave_sigterm_to_distmnist(trainer)
        trainer.fit(BoringModel())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [ours, ours], seen


def test_lightning_turns_a_keyboard_interrupt_in_fit_into_exit_1():
    """What a Ctrl-C would do to a Trainer run if SIGINT were not distmnist's during fit: Lightning catches the
    KeyboardInterrupt ("Detected KeyboardInterrupt, attempting graceful shutdown"), ignores SIGINT while it tears
    down, and exits 1, with no checkpoint. When this changes, so may the reason core.stopping takes SIGINT over
    before fit."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Interrupted(BoringModel):
        def training_step(self, batch, batch_idx):
            raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stop:
            quiet_trainer(max_steps=1, limit_val_batches=0).fit(Interrupted())
        assert stop.value.code == 1
    finally:
        signal.signal(signal.SIGINT, previous)


def test_lightning_names_the_running_hook_in_current_fx_name():
    module = internals.with_fast_hooks(LitClassifier)(load_config("smoke"))
    assert "_current_fx_name" in vars(module)  # LightningModule.__init__ sets it; FastHooks writes it cheaply
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step"
    module.extra = torch.nn.Linear(1, 1)  # every other attribute still goes through nn.Module.__setattr__
    assert "extra" in dict(module.named_children())


def test_tensorboard_logger_creates_its_writer_lazily(tmp_path):
    logger = internals.RunLogger(save_dir=str(tmp_path), name="tb", version="")
    assert logger._experiment is None
    logger.finalize("failed")
    assert not any(tmp_path.rglob("events.out.tfevents.*")), "finalize() of an unused logger wrote an event file"
    logger.experiment.add_scalar("x", 1.0, 0)
    logger.finalize("success")
    assert any(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("graph_step", [False, True])
def test_tuned_module_keeps_the_lightning_hooks_it_overrides(graph_step):
    tuned = internals.with_fast_hooks(LitClassifier, graph_step)
    hooks = ["optimizer_zero_grad", "transfer_batch_to_device"] + (["training_step", "backward"] if graph_step else [])
    for hook in hooks:  # the hooks it replaces are still Lightning's hooks, called with the same parameters
        ours, theirs = inspect.signature(getattr(tuned, hook)), inspect.signature(getattr(L.LightningModule, hook))
        assert getattr(tuned, hook) is not getattr(L.LightningModule, hook)
        if not any(p.kind is p.VAR_POSITIONAL for p in theirs.parameters.values()):
            assert list(ours.parameters)[:3] == list(theirs.parameters)[:3], hook


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_batches(n: int):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(2.0 * n).view(n, 2)), batch_size=1)


class SaveAtStep(L.Callback):
    def __init__(self, path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("recount", [True, False])
def test_a_checkpoint_counts_micro_batches_where_recount_batches_looks(tmp_path, recount):
    """Saved after 2 optimizer steps of accumulation 2 (4 micro-batches), resumed with accumulation 1 in an epoch of
    4 batches: recounted, the epoch continues for the 2 steps left and ends at step 4; left as Lightning saved it
    (4 batches of the epoch done), Lightning's loop does not (it ran 4 more steps, to 6, in 2.6) -- the difference
    recount_batches makes."""
    path = tmp_path / "mid.ckpt"
    quiet_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[SaveAtStep(path, 2)]).fit(
        Tiny(), train_dataloaders=tiny_batches(8))
    ckpt = torch.load(path, weights_only=False)
    progress = ckpt
    for key in internals.BATCH_PROGRESS:
        progress = progress[key]
    assert progress["current"]["ready"] == progress["total"]["ready"] == 4
    if recount:
        internals.recount_batches(ckpt, was=2, now=1)
        assert progress["current"]["ready"] == 2
    torch.save(ckpt, path)
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=1)
    trainer.fit(Tiny(), train_dataloaders=tiny_batches(4), ckpt_path=path)
    assert (trainer.global_step == 4) is recount, trainer.global_step


# ---------------------------------------------------------- adapters.sharded_strategy: ModelParallelStrategy
SHARDED = {  # Lightning's ModelParallelStrategy -> the methods sharded_strategy replaces in it
    "trainer": (ModelParallelStrategy, {"save_checkpoint", "load_checkpoint", "block_backward_sync"}),
    "fabric": (FabricModelParallelStrategy, {"save_checkpoint", "load_checkpoint"}),
}


def parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("api", SHARDED)
def test_sharded_strategy_replaces_methods_lightning_calls_with_the_parameters_it_passes(api):
    """Lightning calls them by keyword (Fabric: ``save_checkpoint(path=, state=, filter=)``,
    ``load_checkpoint(path=, state=, strict=, weights_only=)``; the Trainer: ``storage_options=``,
    ``weights_only=``; its loop: ``block_backward_sync()``): each must still be Lightning's method, with the same
    parameters in the same order and the same defaults."""
    lightning_class, replaced = SHARDED[api]
    ours = adapters.sharded_strategy(lightning_class)
    assert {name for name, value in vars(ours).items() if callable(value)} == replaced
    for name in sorted(replaced):
        theirs = getattr(lightning_class, name, None)
        assert callable(theirs), f"{lightning_class.__qualname__}.{name} is gone"
        assert getattr(ours, name) is not theirs
        assert parameters(getattr(ours, name)) == parameters(theirs), f"{lightning_class.__qualname__}.{name}"


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one in this process: ModelParallelStrategy uses the one that is up. The variables
    its setup exports (MASTER_ADDR/PORT, LOCAL_RANK, NODE_RANK, OMP_NUM_THREADS) are taken back afterwards: the
    later tests' child processes inherit this environment."""
    environ = dict(os.environ)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


class ParallelTiny(Tiny):
    def configure_model(self) -> None:
        pass  # ModelParallelStrategy requires the hook; one process has nothing to shard (layout: test_fsdp.py)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # an optimizer state to restore


def test_the_trainer_saves_resumes_and_accumulates_through_the_sharded_strategy(tmp_path, group_of_one):
    """A Trainer with TrainerShardedStrategy (one process): its save_checkpoint gets Lightning's checkpoint dict with
    the model under STATE_DICT and a list of OPTIMIZER_STATES, the keys its load_checkpoint rebuilds; a resume
    through load_checkpoint restores weights, optimizer and step (Lightning reads OPTIMIZER_STATES from the dict it
    returns); and the loop enters block_backward_sync on each accumulating micro-batch, not on the one that steps
    -- where FSDP2's reduce-scatter is skipped."""
    entered = []

    class Probe(adapters.sharded_strategy(ModelParallelStrategy)):
        @contextmanager
        def block_backward_sync(self):
            entered.append(self.lightning_module.trainer.global_step)
            with super().block_backward_sync():
                yield

    def fit(max_steps: int, ckpt_path=None) -> tuple[L.Trainer, ParallelTiny]:
        trainer = quiet_trainer(max_steps=max_steps, accumulate_grad_batches=2, plugins=[LightningEnvironment()],
                                strategy=Probe(data_parallel_size=1, tensor_parallel_size=1))
        module = ParallelTiny()
        trainer.fit(module, train_dataloaders=tiny_batches(8), ckpt_path=ckpt_path)
        return trainer, module

    path = tmp_path / "step=2.ckpt"
    trainer, module = fit(2)
    assert entered == [0, 1]  # micro-batches 1 and 3 of 4 accumulate, 2 and 4 step
    trainer.save_checkpoint(path)
    meta = checkpoint.read(path / checkpoint.META)  # what is not a shard, as save_sharded stored it
    assert set(meta[adapters.STATE_DICT]) == {"layer.weight", "layer.bias"}
    assert isinstance(meta[adapters.OPTIMIZER_STATES], list) and len(meta[adapters.OPTIMIZER_STATES]) == 1
    momentum = trainer.optimizers[0].state[module.layer.weight]["momentum_buffer"].clone()

    resumed, again = fit(2, ckpt_path=path)  # max_steps reached: restored, not trained further
    assert resumed.global_step == 2
    assert torch.equal(again.layer.weight, module.layer.weight) and torch.equal(again.layer.bias, module.layer.bias)
    assert torch.equal(resumed.optimizers[0].state[again.layer.weight]["momentum_buffer"], momentum)


# ------------------------------------------------------------- per-step costs: NoProfiler, check_step_signature_once
class CountingProfiler(internals.NoProfiler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def profile(self, action_name: str):
        self.names.append(action_name)
        return super().profile(action_name)


def test_the_trainer_enters_its_profiler_around_every_hook_and_no_profiler_is_a_null_context():
    """Lightning enters ``trainer.profiler.profile(name)`` around each hook (a generator per call with the default
    PassThroughProfiler); NoProfiler is that profiler, its ``profile`` one shared null context."""
    assert issubclass(internals.NoProfiler, PassThroughProfiler)
    assert callable(getattr(PassThroughProfiler, "profile", None))
    profiler = CountingProfiler()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, profiler=profiler)
    assert trainer.profiler is profiler
    trainer.fit(Tiny(), train_dataloaders=tiny_batches(4))
    assert "run_training_batch" in profiler.names and any("training_step" in n for n in profiler.names)
    with profiler.profile("x") as entered:
        assert entered is None
    assert internals.NoProfiler().profile("a") is internals.NoProfiler().profile("b")


class StepIndices(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch_idx)
        return super().training_step(batch, batch_idx)


class NoStepIndex(Tiny):
    def training_step(self, batch):
        return self.layer(batch[0]).sum()


def test_the_training_loop_builds_the_step_arguments_where_check_step_signature_once_decides_them():
    """``_build_kwargs(kwargs, batch, batch_idx)`` is still the epoch loop's; with the decision taken once, a
    training_step with batch_idx gets every index and one without it gets none (both fit)."""
    loop = quiet_trainer().fit_loop.epoch_loop
    assert list(inspect.signature(loop._build_kwargs).parameters) == ["kwargs", "batch", "batch_idx"]
    for module_class in (StepIndices, NoStepIndex):
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
        internals.check_step_signature_once(trainer)
        assert trainer.fit_loop.epoch_loop._build_kwargs is not loop._build_kwargs
        module = module_class()
        trainer.fit(module, train_dataloaders=tiny_batches(3))
        assert trainer.global_step == 3
        if module_class is StepIndices:
            assert module.seen == [0, 1, 2]


class PairTiny(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[1].clone())
        return self.layer(batch[0]).sum()


class Shifted(L.LightningDataModule):
    """A data module whose on_before_batch_transfer adds 100 to the targets (or, `plain`, has no batch hooks)."""

    def __init__(self, plain: bool) -> None:
        super().__init__()
        if not plain:
            self.on_before_batch_transfer = lambda batch, dataloader_idx: (batch[0], batch[1] + 100)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.arange(6.0).view(3, 2), torch.arange(3))
        return torch.utils.data.DataLoader(data, batch_size=1)


def test_lightning_routes_batches_through_the_module_methods_fast_hooks_replaces():
    """Lightning 2.6's loop passes each batch through LightningModule._on_before_batch_transfer and (its strategy's
    batch_to_device) _apply_batch_transfer_handler, with these parameters; FastHooks hands the batch on directly when
    no batch hook is overridden, and leaves an overridden one (here the data module's) to Lightning."""
    for name, params in (("_on_before_batch_transfer", ["self", "batch", "dataloader_idx"]),
                         ("_apply_batch_transfer_handler", ["self", "batch", "device", "dataloader_idx"])):
        assert list(inspect.signature(getattr(L.LightningModule, name)).parameters) == params, name
    calls = []

    class Probe(internals.FastHooks, PairTiny):
        def _apply_batch_transfer_handler(self, batch, device=None, dataloader_idx: int = 0):
            calls.append(self._plain_batch_hooks())
            return super()._apply_batch_transfer_handler(batch, device, dataloader_idx)

    for plain in (True, False):
        calls.clear()
        module = Probe()
        quiet_trainer(max_epochs=1, limit_val_batches=0).fit(module, datamodule=Shifted(plain))
        assert calls == [plain] * 3
        assert [int(y) for y in module.seen] == [i + (0 if plain else 100) for i in range(3)]


# ------------------------------------------------- skip_hooks_that_do_nothing, compare_trainer_states_by_identity
PER_STEP_DEFAULTS = {  # hooks Lightning 2.6 dispatches every training step whose default body is `pass`
    L.Callback: ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                 "on_before_zero_grad", "on_train_batch_end"),
    L.LightningModule: ("on_train_batch_start", "on_before_backward", "on_after_backward",
                        "on_before_optimizer_step", "on_before_zero_grad", "on_train_batch_end"),
}


def test_the_per_step_hooks_lightning_defines_do_nothing_and_others_do():
    """What skip_hooks_that_do_nothing skips: Lightning's default per-step hooks (if one gains a body, the dispatch
    is kept -- and this fails, since the speed-up is gone); never a hook with a body, a generator or a builtin."""
    from lightning.pytorch.strategies import Strategy

    for owner, hooks in PER_STEP_DEFAULTS.items():
        for hook in hooks:
            assert dispatch.does_nothing(getattr(owner, hook)), f"{owner.__name__}.{hook}"
    assert dispatch.does_nothing(Strategy.on_train_batch_start)

    def acts(x):
        return x

    def generator():
        return
        yield

    for function in (acts, generator, len, L.LightningModule.lr_scheduler_step, L.LightningModule.optimizer_step,
                     Strategy.training_step, Strategy.batch_to_device, Tiny().training_step):
        assert not dispatch.does_nothing(function), function


def test_lightning_dispatches_hooks_through_the_call_module_with_these_parameters():
    """The loops call ``call._call_callback_hooks`` / ``_call_lightning_module_hook`` / ``_call_strategy_hook`` as
    attributes of ``lightning.pytorch.trainer.call`` (where skip_hooks_that_do_nothing replaces them), with these
    parameters; Strategy.lightning_module is its ``_lightning_module``."""
    from lightning.pytorch.loops import fit_loop, training_epoch_loop
    from lightning.pytorch.loops.optimization import automatic
    from lightning.pytorch.plugins.precision import precision
    from lightning.pytorch.strategies import Strategy
    from lightning.pytorch.trainer import call

    expected = {"_call_callback_hooks": ["trainer", "hook_name", "args", "monitoring_callbacks", "kwargs"],
                "_call_lightning_module_hook": ["trainer", "hook_name", "args", "pl_module", "kwargs"],
                "_call_strategy_hook": ["trainer", "hook_name", "args", "kwargs"]}
    for name, params in expected.items():
        dispatcher = getattr(call, name)
        assert list(inspect.signature(dispatcher).parameters) == params, name
    for module in (fit_loop, training_epoch_loop, automatic, precision):
        assert module.call is call, module.__name__
    assert inspect.getsource(Strategy.lightning_module.fget).strip().endswith("return self._lightning_module")


class HookRecorder(L.Callback):
    """Which hooks run, in order, with the module's _current_fx_name at the time."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(("callback", "on_train_batch_start", pl_module._current_fx_name, batch_idx))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(("callback", "on_train_batch_end", pl_module._current_fx_name, float(outputs["loss"])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(("callback", "on_before_optimizer_step", pl_module._current_fx_name, trainer.global_step))


class RecordingTiny(Tiny):
    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def on_after_backward(self):
        self.seen.append(("module", "on_after_backward", self._current_fx_name, self.trainer.global_step))

    def lr_scheduler_step(self, scheduler, metric):
        self.seen.append(("module", "lr_scheduler_step", self._current_fx_name, self.trainer.global_step))
        super().lr_scheduler_step(scheduler, metric)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1), "interval": "step"}}


@pytest.mark.parametrize("profiler", ["none", "counting"])
def test_a_trainer_that_skips_idle_hooks_runs_the_others_as_lightning_does(profiler):
    """The same hooks with something to do, in the same order, with the same _current_fx_name and arguments, the
    same weights, with and without the plan; the Callback defaults are not called at all (a trainer with a profiler
    that records, and any trainer without the plan, keeps Lightning's dispatch)."""
    runs = {}
    for plan in (False, True):
        seen = []
        torch.manual_seed(0)
        module = RecordingTiny(seen)
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[HookRecorder(seen), L.Callback()],
                                profiler=CountingProfiler() if profiler == "counting" else internals.NoProfiler())
        if plan:
            dispatch.skip_hooks_that_do_nothing(trainer)
        trainer.fit(module, train_dataloaders=tiny_batches(4))
        assert trainer.lightning_module is trainer.strategy._lightning_module
        runs[plan] = seen, module.layer.weight.detach().clone()
        if plan:
            assert hasattr(trainer, dispatch.HOOK_PLAN) is (profiler == "none")
    assert runs[False][0] == runs[True][0] and len(runs[True][0]) == 3 * 5, runs[True][0]
    assert torch.equal(runs[False][1], runs[True][1])


def test_the_plan_skips_the_default_hooks_and_calls_each_callback_that_acts():
    """Every Callback and LightningModule default in PER_STEP_DEFAULTS runs each step under Lightning's dispatch, and
    none does with the plan; a callback whose hook has a body runs every step either way."""
    defaults = {getattr(owner, hook).__code__ for owner, hooks in PER_STEP_DEFAULTS.items() for hook in hooks}
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in defaults:
            entered.append(frame.f_code.co_name)

    for plan in (False, True):
        entered.clear()
        seen = []
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[HookRecorder(seen), L.Callback()],
                                profiler=internals.NoProfiler())
        if plan:
            dispatch.skip_hooks_that_do_nothing(trainer)
        sys.setprofile(profile)
        try:
            trainer.fit(RecordingTiny([]), train_dataloaders=tiny_batches(4))
        finally:
            sys.setprofile(None)
        assert [entry[1] for entry in seen] == ["on_train_batch_start", "on_before_optimizer_step",
                                                "on_train_batch_end"] * 3
        if plan:
            assert entered == []
        else:  # each step: the module's 5 defaults (on_after_backward is RecordingTiny's), 2 callbacks' 6, less 3
            assert len(entered) == 3 * (5 + 2 * 6 - 3), sorted(set(entered))


def test_trainer_states_compare_by_identity_as_lightning_compares_them():
    """Two members of RunningStage, TrainerFn or TrainerStatus are equal only when they are the same member (what
    compare_trainer_states_by_identity relies on); after it, every comparison answers as before, hashes unchanged."""
    from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus
    from lightning_utilities.core.enums import StrEnum

    enums = (RunningStage, TrainerFn, TrainerStatus)
    others = [None, "train", "TRAIN", "fit", "running", "sanity_check", 3]
    before = {(a, b): a == b for e in enums for a in e for b in [*e, *others]}
    hashes = {a: hash(a) for e in enums for a in e}
    for e in enums:
        assert e.__eq__ is StrEnum.__eq__ or getattr(e.__eq__, "by_identity", False)
        assert not any(a is not b and StrEnum.__eq__(a, b) for a in e for b in e), e
    dispatch.compare_trainer_states_by_identity()
    for e in enums:
        assert getattr(e.__eq__, "by_identity", False), e
    assert {(a, b): a == b for e in enums for a in e for b in [*e, *others]} == before
    assert {a: hash(a) for e in enums for a in e} == hashes
    assert RunningStage.TRAINING == "train" and "train" == RunningStage.TRAINING and RunningStage.TRAINING != "fit"
    assert inspect.getsource(L.Trainer.training.fget).strip().endswith("== RunningStage.TRAINING")


@pytest.mark.parametrize("clip", [None, 0.05])
def test_fast_hooks_leave_gradient_clipping_to_lightning_when_it_is_configured(clip):
    """FastHooks.configure_gradient_clipping returns at once when no clipping is configured (Lightning 2.6's default
    hands clip 0 to the precision plugin, which returns) and is Lightning's otherwise: the same weights either way."""
    from lightning.pytorch.plugins.precision import Precision

    assert list(inspect.signature(L.LightningModule.configure_gradient_clipping).parameters) == [
        "self", "optimizer", "gradient_clip_val", "gradient_clip_algorithm"]
    weights = []
    for module_class in (Tiny, type("FastTiny", (internals.FastHooks, Tiny), {})):
        torch.manual_seed(0)
        module = module_class()
        pairs = torch.utils.data.TensorDataset(torch.arange(8.0).view(4, 2), torch.arange(4))
        quiet_trainer(max_steps=3, limit_val_batches=0, gradient_clip_val=clip).fit(
            module, train_dataloaders=torch.utils.data.DataLoader(pairs, batch_size=1))
        weights.append(module.layer.weight.detach().clone())
    assert torch.equal(*weights)
    clipped = []

    class Spy(Precision):
        def clip_grad_by_norm(self, optimizer, clip_val):
            clipped.append(clip_val)

    Spy().clip_gradients(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), 0.0)
    assert clipped == []


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple] = []  # (outputs["loss"], whether it has a grad_fn) after every micro-batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append((outputs["loss"].item(), outputs["loss"].grad_fn is None))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_undivided_loss_trains_and_reports_as_lightnings_closure_result(accumulate):
    """Lightning 2.6's automatic optimization builds its ClosureResult through ``output_result_cls`` (divided by
    accumulate_grad_batches, copied in ``_clone_loss``); with UndividedLoss the same weights, the same (detached)
    losses in the outputs, with and without accumulation -- and no division node when nothing accumulates."""
    from lightning.pytorch.loops.optimization.automatic import ClosureResult, _AutomaticOptimization

    assert _AutomaticOptimization.output_result_cls is ClosureResult
    assert list(inspect.signature(ClosureResult.from_training_step_output).parameters) == [
        "training_step_output", "normalize"]
    assert "_clone_loss" in inspect.getsource(ClosureResult.__post_init__)
    runs = []
    for undivided in (False, True):
        torch.manual_seed(0)
        module, recorder = Tiny(), LossRecorder()
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, accumulate_grad_batches=accumulate,
                                callbacks=[recorder])
        if undivided:
            internals.loss_undivided_without_accumulation(trainer)
            assert trainer.fit_loop.epoch_loop.automatic_optimization.output_result_cls is internals.UndividedLoss
        trainer.fit(module, train_dataloaders=tiny_batches(3 * accumulate))
        runs.append((module.layer.weight.detach().clone(), recorder.losses))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and len(runs[1][1]) == 3 * accumulate and all(d for _, d in runs[1][1])
    loss = torch.ones(2, requires_grad=True).sum()
    assert internals.UndividedLoss.from_training_step_output(loss, 1).closure_loss is loss
    assert internals.UndividedLoss.from_training_step_output(loss, 2).closure_loss.grad_fn.name() == "DivBackward0"
