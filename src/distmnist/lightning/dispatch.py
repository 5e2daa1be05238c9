"""Lightning's per-step hook dispatch, without what does nothing (written against Lightning 2.6; part of the fence
that ``internals.py`` opens: the same rules, the canaries in ``tests/test_lightning_internals.py``).

* :func:`skip_hooks_that_do_nothing` -- the dispatch of every callback, module and strategy hook whose body is
  ``pass`` (most of the ~20 hook calls a step), and the debug line and profiler scope of the others.
* :func:`compare_trainer_states_by_identity` -- the trainer's state compared with its enums (~13 a step) without
  lower-casing both values each time.
"""

from __future__ import annotations

import dis
import inspect
import types

from lightning.pytorch.profilers import PassThroughProfiler

from distmnist.lightning.internals import NoProfiler


def does_nothing(function) -> bool:
    """`function` (or the function of a bound method) is plain Python whose body is ``pass``, a docstring or
    ``return None``: calling it has no effect. Anything else (a builtin, a decorated or generator function) does."""
    function = getattr(function, "__func__", function)
    if not isinstance(function, types.FunctionType):
        return False
    code = function.__code__
    if code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
        return False
    ops = [(i.opname, i.argval) for i in dis.get_instructions(code) if i.opname not in ("RESUME", "NOP", "CACHE")]
    return ops in ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])


HOOK_PLAN = "_distmnist_hook_plan"  # the Trainer attribute that makes the dispatchers below skip what does nothing
DISPATCHERS = ("_call_callback_hooks", "_call_lightning_module_hook", "_call_strategy_hook")


class _HookPlan:
    """Per trainer: which functions do nothing (by function), which callbacks act on each hook (by callback list)."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy  # trainer.strategy (fixed when the Trainer is made); its _lightning_module is
        # what trainer.lightning_module returns, read without the three properties in between
        self.idle: dict = {}  # function -> does_nothing(function)
        self.callbacks: tuple = ()  # the trainer's callbacks that `acting` was worked out for
        self.acting: dict[str, list] = {}  # hook name -> the callbacks whose hook does something

    def is_idle(self, function) -> bool:
        idle = self.idle.get(function)
        if idle is None:
            idle = self.idle[function] = does_nothing(function)
        return idle

    def acting_callbacks(self, callbacks: list, hook_name: str) -> list:
        key = tuple(callbacks)
        if key != self.callbacks:  # Lightning adds the module's configure_callbacks() when fit starts
            self.callbacks, self.acting = key, {}
        acting = self.acting[hook_name] = [cb for cb in key if not does_nothing(getattr(cb, hook_name))]
        return acting


def _call_named(pl_module, hook_name: str, fn, args: tuple, kwargs: dict):
    """`fn(*args, **kwargs)` with the module's ``_current_fx_name`` set to `hook_name` meanwhile, as Lightning's
    dispatchers do (a plain attribute: written past nn.Module.__setattr__)."""
    prev_fx_name = pl_module._current_fx_name
    object.__setattr__(pl_module, "_current_fx_name", hook_name)
    output = fn(*args, **kwargs)
    object.__setattr__(pl_module, "_current_fx_name", prev_fx_name)
    return output


def _planned_dispatchers(call) -> dict:
    """Lightning 2.6's three hook dispatchers of ``lightning.pytorch.trainer.call``, each replaced by one that, for a
    trainer with a _HookPlan, does what the stock one does without its ``log.debug`` line and profiler scope (the
    plan is only made for a profiler that records nothing), and calls nothing when the hook does nothing. A trainer
    without a plan gets the stock dispatcher."""
    callback_hooks, module_hook, strategy_hook = (getattr(call, name) for name in DISPATCHERS)

    def _call_callback_hooks(trainer, hook_name, *args, monitoring_callbacks=None, **kwargs):
        plan = getattr(trainer, HOOK_PLAN, None)
        if plan is None or monitoring_callbacks is not None:
            return callback_hooks(trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs)
        acting = plan.acting.get(hook_name)
        if acting is None or plan.callbacks != tuple(trainer.callbacks):
            acting = plan.acting_callbacks(trainer.callbacks, hook_name)
        if not acting:
            return None
        pl_module = plan.strategy._lightning_module
        if pl_module:
            prev_fx_name = pl_module._current_fx_name
            object.__setattr__(pl_module, "_current_fx_name", hook_name)
        for callback in acting:
            getattr(callback, hook_name)(trainer, pl_module, *args, **kwargs)
        if pl_module:
            object.__setattr__(pl_module, "_current_fx_name", prev_fx_name)
        return None

    def _call_lightning_module_hook(trainer, hook_name, *args, pl_module=None, **kwargs):
        plan = getattr(trainer, HOOK_PLAN, None)
        if plan is None or (pl_module := pl_module or plan.strategy._lightning_module) is None:
            return module_hook(trainer, hook_name, *args, pl_module=pl_module, **kwargs)
        fn = getattr(pl_module, hook_name)
        function = getattr(fn, "__func__", None)  # a method (not an instance attribute)
        if function is not None and plan.is_idle(function) or function is None and not callable(fn):
            return None
        return _call_named(pl_module, hook_name, fn, args, kwargs)

    def _call_strategy_hook(trainer, hook_name, *args, **kwargs):
        plan = getattr(trainer, HOOK_PLAN, None)
        if plan is None:
            return strategy_hook(trainer, hook_name, *args, **kwargs)
        strategy = plan.strategy
        pl_module = strategy._lightning_module
        fn = getattr(strategy, hook_name)
        function = getattr(fn, "__func__", None)
        if pl_module is None or function is None:
            return strategy_hook(trainer, hook_name, *args, **kwargs)
        if plan.is_idle(function):
            return None
        return _call_named(pl_module, hook_name, fn, args, kwargs)

    return dict(zip(DISPATCHERS, (_call_callback_hooks, _call_lightning_module_hook, _call_strategy_hook), strict=True))


def skip_hooks_that_do_nothing(trainer) -> None:
    """Lightning 2.6 dispatches ~20 hooks a step, each through ``lightning.pytorch.trainer.call``
    (``_call_callback_hooks``: every callback, ``_call_lightning_module_hook``, ``_call_strategy_hook``) with a
    ``log.debug`` line, profiler scope, ``_current_fx_name`` bookkeeping and ``trainer.lightning_module`` reads;
    most of them (the Callback, LightningModule and Strategy defaults: on_before_backward, on_after_backward,
    on_before_optimizer_step, on_before_zero_grad, and the batch start/end hooks nobody overrides) have ``pass`` for a
    body. For this trainer the hooks whose function does nothing (:func:`does_nothing`, decided once per function)
    are not called at all, and the others are called as Lightning calls them, with the same ``_current_fx_name``
    (written past nn.Module.__setattr__: it is a plain attribute) but no debug line or profiler scope -- so only with
    a profiler that records nothing (PassThroughProfiler, NoProfiler), else nothing changes. The module is read
    where ``Strategy.lightning_module`` reads it (``strategy._lightning_module``; a strategy that overrides that
    property keeps the stock dispatch). The loops reach the dispatchers as ``call.<name>`` (``from
    lightning.pytorch.trainer import call``): they are replaced there, once per process, by ones that hand every
    trainer without this plan (``monitoring_callbacks`` calls too) to Lightning's own. A Lightning without these
    three functions is left alone. Not seen: a hook assigned to a callback after its first dispatch."""
    from lightning.pytorch.strategies import Strategy
    from lightning.pytorch.trainer import call

    if type(trainer.profiler) not in (PassThroughProfiler, NoProfiler):
        return
    if getattr(type(trainer.strategy), "lightning_module", None) is not Strategy.__dict__.get("lightning_module"):
        return  # a strategy whose lightning_module is not Lightning 2.6's `return self._lightning_module`
    if not all(callable(getattr(call, name, None)) for name in DISPATCHERS):
        return
    if not getattr(call._call_callback_hooks, "planned", False):
        for name, dispatcher in _planned_dispatchers(call).items():
            dispatcher.planned = True
            setattr(call, name, dispatcher)
    setattr(trainer, HOOK_PLAN, _HookPlan(trainer.strategy))


def compare_trainer_states_by_identity() -> None:
    """Lightning 2.6 compares the trainer's state with its enums several times a step (``Trainer.training`` is
    ``state.stage == RunningStage.TRAINING``, ~13 a step through ``_active_loop`` and the logger connector's
    ``_results``); lightning_utilities' ``LightningEnum.__eq__`` lower-cases both values each time. For RunningStage,
    TrainerFn and TrainerStatus, two members are equal only when they are the same member (checked here, for every
    pair), so a member compared with a member of its own enum is compared by identity; against anything else (a
    string, None) the stock ``__eq__`` answers. Once per process; ``__hash__`` is untouched."""
    from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus

    for enum in (RunningStage, TrainerFn, TrainerStatus):
        stock = enum.__eq__
        if getattr(stock, "by_identity", False):
            continue
        if any(a is not b and stock(a, b) for a in enum for b in enum):
            continue  # two members equal: identity would not answer as stock does

        def __eq__(self, other, stock=stock):
            if other.__class__ is self.__class__:
                return self is other
            return stock(self, other)

        __eq__.by_identity = True
        enum.__eq__ = __eq__
