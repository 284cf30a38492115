"""Which slot a request takes in the batching context: the free one whose cached prefix is
longest, else the least recently used (an empty one first); never its prompt's last token."""

from __future__ import annotations

from llmops.app.serving.slots import Slots, common_prefix


def test_the_longest_shared_prefix_wins_and_the_last_token_is_decoded_again() -> None:
    slots = Slots(3)
    a, b = slots.take([1, 2, 3]), slots.take([7, 8])
    slots.give_back(a, [1, 2, 3, 4, 5])
    slots.give_back(b, [7, 8, 9])
    assert slots.take([1, 2, 3, 4, 5]) == a
    assert slots.reusable(a, [1, 2, 3, 4, 5]) == 4  # the last token's logits start the answer
    assert slots.reusable(a, [1, 2, 9]) == 2
    assert slots.reusable(a, [5]) == 0 and slots.reusable(a, []) == 0
    assert slots.take([7, 8, 1]) == b


def test_without_a_shared_prefix_an_empty_slot_then_the_least_recently_used_is_taken() -> None:
    slots = Slots(3)
    first, second = slots.take([1]), slots.take([2])
    slots.give_back(first, [1, 1])
    slots.give_back(second, [2, 2])
    empty = ({0, 1, 2} - {first, second}).pop()
    assert slots.take([5]) == empty  # a cache in use lives longer
    slots.give_back(empty, None)
    assert slots.take([6]) == empty
    assert slots.take([6]) == first  # of the two caches, the one used longest ago goes
    assert slots.free == [second]


def test_reset_empties_every_slot() -> None:
    slots = Slots(2)
    s = slots.take([1])
    slots.give_back(s, [1, 2])
    slots.take([3])
    slots.reset()
    assert sorted(slots.free) == [0, 1] and all(not held for held in slots.held.values())
    assert common_prefix([1, 2, 3], [1, 2]) == 2 and common_prefix([], [1]) == 0
