"""core/metrics.py's TrainTally: the steps it keeps and adds up every COUNT_EVERY steps give the sums that adding
at every step gives, bit for bit, however often the sums are read (a mid-epoch checkpoint, the divergence check)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distmnist.core.metrics import TrainTally
from distmnist.core.state import TallySums


def steps(n: int):
    """`n` steps of (logits, target, loss) with a graph attached, the last batch short; losses of mixed magnitude."""
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        b = 64 if i < n - 1 else 17
        scale = 10.0 ** (i % 7 - 3)  # from confident to undecided logits: losses from ~1e-3 to ~2.3
        logits = (torch.randn(b, 10, generator=g) / scale).requires_grad_()
        target = torch.randint(0, 10, (b,), generator=g)
        yield logits, target, F.cross_entropy(logits, target)


@pytest.mark.parametrize("read_every", [None, 1, 10, 63, 64, 65])
def test_the_kept_steps_add_up_to_the_per_step_sums_bit_for_bit(read_every):
    tally = TrainTally(torch.device("cpu"))
    loss_sum = torch.zeros((), dtype=torch.float64)  # the per-step arithmetic (as before the steps were kept)
    correct = count = 0
    for i, (logits, target, loss) in enumerate(steps(150), start=1):
        tally.update(logits, target, loss)
        loss_sum.add_(loss.detach(), alpha=target.shape[0])
        correct += int((logits.argmax(dim=1) == target).sum())
        count += target.shape[0]
        if not read_every:  # kept until every COUNT_EVERY-th step adds them up
            assert len(tally.kept) == i % TrainTally.COUNT_EVERY
        if read_every and i % read_every == 0:
            assert tally.nonfinite().item() == 0
            assert tally.all_state() == TallySums(loss_sum.item(), correct, count)
            assert tally.kept == []
    assert tally.all_compute() == {"train_loss": loss_sum.item() / count, "train_acc": correct / count,
                                   "train_samples": count}
    assert tally.all_compute()["train_samples"] == 0  # reset


def test_a_graph_step_adds_at_once_and_a_restore_drops_what_was_kept():
    tally = TrainTally(torch.device("cpu"))
    (logits, target, loss), *_ = steps(2)
    tally.update(logits, target, loss, defer=False)
    assert tally.kept == [] and tally.sums[2].item() == 64
    tally.update(logits, target, loss)
    tally.restore(TallySums(1.5, 3.0, 4.0), is_zero=True)
    assert tally.kept == [] and tally.all_state() == TallySums(1.5, 3.0, 4.0)


def test_a_nonfinite_loss_is_seen_before_the_kept_steps_are_added():
    tally = TrainTally(torch.device("cpu"))
    (logits, target, loss), *_ = steps(2)
    tally.update(logits, target, loss)
    tally.update(logits, target, torch.tensor(float("nan")))
    assert tally.nonfinite().item() == 1
