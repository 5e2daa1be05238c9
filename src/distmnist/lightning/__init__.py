"""All of distmnist's Lightning-specific code (``distmnist.core`` imports torch, never Lightning).

* :mod:`distmnist.lightning.adapters` -- what ``fabric.py`` and ``trainer.py`` plug into Lightning through its
  public API: the CheckpointIO plugin (the core's atomic writer and validated reader), ``ModelParallelStrategy``
  with the core's sharded checkpoints, the cluster environment of the launcher, and the parallelize function
  (the core's FSDP2 layout).
* :mod:`distmnist.lightning.internals` -- what ``trainer.py`` does beyond Lightning's public API (for speed or
  for a clean run), fenced: written against one Lightning version, stock behaviour when what it relies on is
  missing; :mod:`distmnist.lightning.dispatch`, under the same fence, the per-step hook dispatch without the
  hooks that do nothing.

``tests/test_lightning_internals.py`` fails when a Lightning upgrade changes what either relies on beyond the
public API.
"""
