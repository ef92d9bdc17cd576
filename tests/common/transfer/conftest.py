"""Fixtures every transfer test module uses. `sender` serves the requesting module's `pool` fixture
(a stand-in KV pool with `gather_blocks`) with the module's layout `LAYOUT`."""

import queue

import pytest

from common.transfer import create_receiver, create_sender


@pytest.fixture
def releases() -> queue.Queue:
    """Collects on_release calls: pass `lambda *args: releases.put(args)` as the callback."""
    return queue.Queue()


@pytest.fixture(params=["fake", "ucx"])
def backend(request):
    return request.param


@pytest.fixture
def sender(request, backend, pool, releases):
    layout = request.module.LAYOUT
    sender = create_sender(backend, layout, pool.gather_blocks, lambda *args: releases.put(args), ack_timeout_seconds=5)
    yield sender
    sender.close()


@pytest.fixture
def receiver(request, backend):
    receiver = create_receiver(backend, request.module.LAYOUT, timeout_seconds=20)
    yield receiver
    receiver.close()
