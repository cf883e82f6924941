"""Barrier alignment: what is held, when a checkpoint is due, and where the cut lies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.runtime.checkpoint.alignment import BarrierAligner


def make(channels: int = 2, **kw: object) -> BarrierAligner:
    return BarrierAligner(channels, clock=lambda: 0.0, **kw)  # type: ignore[arg-type]


def test_records_after_a_barrier_are_held_until_every_channel_passed() -> None:
    a = make()
    assert a.admit(0, 0) and a.on_record(0, 0, "a0")
    assert a.admit(0, 1)
    a.on_barrier(0, 1, 5)
    assert not a.ready
    assert a.admit(0, 2) and not a.on_record(0, 2, "a-after")  # held
    assert a.admit(1, 3) and a.on_record(1, 3, "b-before")  # other channel still flows
    assert a.admit(1, 4)
    a.on_barrier(1, 4, 5)
    assert a.ready
    cut = a.cut()
    # everything before offset 2 is in; channel 1's records up to its barrier (offset 4) too
    assert (cut.checkpoint_id, cut.offset, cut.skip, cut.aligned) == (5, 2, {1: 5}, True)
    assert a.complete(5) == ["a-after"]
    assert not a.ready


def test_a_channel_that_skipped_ids_counts_as_passed() -> None:
    a = make(last_checkpoint=4)
    a.admit(0, 0)
    a.on_barrier(0, 0, 5)
    a.admit(1, 1)
    a.on_barrier(1, 1, 7)  # restarted upstream: its next barrier is 7
    assert a.ready and a.cut().checkpoint_id == 5
    a.complete(5)
    assert not a.ready  # channel 0 must now pass 7 as well
    a.admit(0, 2)
    a.on_barrier(0, 2, 6)
    assert a.ready and a.cut().checkpoint_id == 6


def test_stale_barriers_are_ignored() -> None:
    a = make(last_checkpoint=9)
    a.admit(0, 0)
    a.on_barrier(0, 0, 3)
    assert a.admit(0, 1) and a.on_record(0, 1, "x")


def test_timeout_forces_an_unaligned_cut_that_includes_everything_read() -> None:
    now = [0.0]
    a = BarrierAligner(2, clock=lambda: now[0], timeout=10)
    a.admit(0, 0)
    a.on_barrier(0, 0, 1)
    a.admit(0, 1)
    a.on_record(0, 1, "held")
    a.admit(1, 2)
    a.on_record(1, 2, "in")
    now[0] = 11
    assert a.timed_out()
    cut = a.cut(force=True)
    assert (cut.checkpoint_id, cut.offset, cut.skip, cut.aligned) == (1, 1, {1: 3}, False)


def test_restore_skip_list_drops_records_already_in_the_state() -> None:
    a = make(position=10, skip={1: 14})
    assert a.admit(0, 10)  # channel 0 is not skipped
    assert not a.admit(1, 11)  # channel 1 up to 13 is already in the state
    assert a.admit(1, 14)
    assert a.admit(1, 15)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.booleans()),  # (channel, is_barrier)
        min_size=1,
        max_size=60,
    )
)
def test_replaying_from_a_cut_reproduces_exactly_the_excluded_records(
    items: list[tuple[int, bool]],
) -> None:
    """Model check of the cut: included + replayed-after-restore == every data record, once."""
    # Each channel's k-th barrier carries id k+1 (ids grow per channel, as from the clock).
    next_id = [1, 1, 1]
    log: list[tuple[int, int | None]] = []  # (channel, barrier id or None)
    for ch, is_barrier in items:
        if is_barrier:
            log.append((ch, next_id[ch]))
            next_id[ch] += 1
        else:
            log.append((ch, None))
    a = make(3)
    processed: list[int] = []
    cut = None
    for offset, (ch, barrier) in enumerate(log):
        a.admit(ch, offset)
        if barrier is not None:
            a.on_barrier(ch, offset, barrier)
            if a.ready:
                cut = a.cut()
                break
        elif a.on_record(ch, offset, offset):
            processed.append(offset)
    if cut is None:
        cut = a.cut(force=True)
    # restore: start at cut.offset, skip per channel below cut.skip[ch]
    b = make(3, last_checkpoint=cut.checkpoint_id, position=cut.offset, skip=cut.skip)
    replayed = []
    for offset in range(cut.offset, len(log)):
        ch, barrier = log[offset]
        if not b.admit(ch, offset):
            continue
        if barrier is None:
            replayed.append(offset)
    data = [o for o, (_, barrier) in enumerate(log) if barrier is None]
    assert sorted(processed + replayed) == data
