"""`BatchCost`: a call's duration against its size, fitted to the calls seen."""

from __future__ import annotations

import pytest

from sttd.engine._batch_cost import BatchCost


def test_nothing_seen_knows_nothing() -> None:
    cost = BatchCost()
    assert (cost.seen, cost.line(), cost.room(1.0), cost.per_request_s(4)) == (
        False, None, None, None)


def test_calls_of_one_size_are_taken_as_a_proportion() -> None:
    cost = BatchCost()
    for _ in range(5):
        cost.observe(2, 0.4)
    assert cost.line() == pytest.approx((0.0, 0.2))
    assert cost.per_request_s(4) == pytest.approx(0.2)


def test_a_fixed_part_and_a_part_per_request_are_told_apart() -> None:
    cost = BatchCost()
    for size in (1, 4, 2, 8, 3, 6, 1, 5):
        cost.observe(size, 0.1 + 0.03 * size)
    fixed, per = cost.line()  # type: ignore[misc]
    assert (fixed, per) == pytest.approx((0.1, 0.03))
    assert cost.room(0.5) == 13  # (0.5 - 0.1) / 0.03
    assert cost.per_request_s(10) == pytest.approx(0.04)


def test_the_newest_calls_weigh_most() -> None:
    cost = BatchCost()
    for size in (1, 2, 3, 4) * 3:
        cost.observe(size, 0.05 * size)  # a quiet machine
    for size in (1, 2, 3, 4) * 6:
        cost.observe(size, 0.1 + 0.1 * size)  # then a loaded one
    fixed, per = cost.line()  # type: ignore[misc]
    assert fixed == pytest.approx(0.1, abs=0.01)
    assert per == pytest.approx(0.1, abs=0.01)


def test_room_is_at_least_one_request() -> None:
    cost = BatchCost()
    for size in (1, 2, 3):
        cost.observe(size, 1.0 + size)
    assert cost.room(0.5) == 1


def test_a_proportion_tries_one_request_more_than_it_has_seen() -> None:
    """Calls of one request each cannot tell a fixed part from a per-request one: the room
    says one fits, but lets one more through, so the next call teaches the line."""
    cost = BatchCost()
    cost.observe(1, 0.3)
    assert cost.room(0.35) == 2
    cost.observe(2, 0.35)  # mostly a fixed part, the two-request call shows
    assert cost.line() is not None and cost.line()[0] > 0  # type: ignore[index]
    # Once a call bigger than the proportion allows was seen, no more is tried.
    other = BatchCost()
    other.observe(4, 0.4)
    assert other.room(0.25) == 2


@pytest.mark.parametrize(("requests", "seconds"), [(0, 1.0), (-1, 1.0), (2, -0.1),
                                                   (2, float("nan"))])
def test_nonsense_observations_are_ignored(requests: int, seconds: float) -> None:
    cost = BatchCost()
    cost.observe(requests, seconds)
    assert cost.seen is False
