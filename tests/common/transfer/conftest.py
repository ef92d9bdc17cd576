"""Fixtures every transfer test module uses."""

import queue

import pytest


@pytest.fixture
def releases() -> queue.Queue:
    """Collects on_release calls: pass `lambda *args: releases.put(args)` as the callback."""
    return queue.Queue()
