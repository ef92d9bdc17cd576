"""freeze_startup_heap: objects alive at start-up leave the collector's reach; later ones stay in it."""

import gc

from common.heap import freeze_startup_heap


class Node:
    def __init__(self):
        self.ref = self  # a cycle: only the collector can free it


def test_startup_objects_are_frozen_and_later_garbage_is_still_collected():
    startup = [Node() for _ in range(100)]
    try:
        assert freeze_startup_heap() >= 100
        tracked = {id(obj) for obj in gc.get_objects()}
        assert not any(id(node) in tracked for node in startup)  # a full collection no longer walks them
        later = Node()
        assert id(later) in {id(obj) for obj in gc.get_objects()}
        del later
        assert gc.collect() >= 1  # the cycle made after the freeze is still found and freed
    finally:
        gc.unfreeze()
