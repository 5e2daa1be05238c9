"""core/peers.py against a real c10d TCPStore on loopback (no training processes; the two-node case, a rank stopped
by damaged data on node2 named where rank 0 is, is test_multinode's test_a_known_error_on_node2_alone_is_named...)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as tdist

from distmnist.core import peers
from distmnist.core.errors import AgreedError, DistMnistError, PeerStopped


@pytest.fixture
def store():
    server = tdist.TCPStore("127.0.0.1", 0, world_size=3, is_master=True, timeout=timedelta(seconds=10),
                            wait_for_workers=False)
    job = tdist.PrefixStore("distmnist/abc/", server)
    yield job, tdist.PrefixStore("distmnist/abc/", tdist.TCPStore("127.0.0.1", server.port, world_size=3,
                                                                   is_master=False, timeout=timedelta(seconds=10)))
    peers.detach()


LOST = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:28327")


def test_a_known_error_is_told_and_names_the_rank_where_a_collective_fails(store):
    zero, two = store
    peers.attach(two, 2)
    err = DistMnistError("data/raw/train-images-idx3-ubyte is damaged:\n  23520008 bytes")
    assert peers.after(err) is err  # raised as it is, once told
    peers.attach(two, 3)
    peers.after(AgreedError("every rank says this alike"))  # not told: rank 0 says it itself
    peers.attach(zero, 0)
    started = time.monotonic()
    named = peers.after(LOST)
    assert isinstance(named, PeerStopped), named
    host = peers._job[2]
    assert str(named) == f"rank 2 on {host} stopped: data/raw/train-images-idx3-ubyte is damaged: 23520008 bytes"
    assert time.monotonic() - started < 1  # the word was there: no wait
    assert peers.after(RuntimeError("a bug, not a collective")).args == ("a bug, not a collective",)


def test_without_a_word_the_lost_peers_error_stands_within_the_look(store):
    zero, _ = store
    peers.attach(zero, 0)
    started = time.monotonic()
    assert peers.after(LOST) is LOST
    assert peers.LOOK_S <= time.monotonic() - started < peers.LOOK_S + 2
    peers.detach()
    assert peers.after(LOST) is LOST  # no job (one process): nothing to look in
