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


# -- quiet channels (alignment.py, "Quiet channels") ----------------------------------------------


def test_a_quiet_channel_counts_as_passed_until_its_next_record() -> None:
    a = make(last_checkpoint=4)
    a.admit(0, 0)
    a.on_barrier(0, 0, 5, quiet=True)  # channel 0: nothing more of mine follows
    a.admit(1, 1)
    a.on_barrier(1, 1, 5)
    assert a.ready and a.cut().checkpoint_id == 5
    a.complete(5)
    a.admit(1, 2)
    a.on_barrier(1, 2, 6)
    # channel 0 sent no barrier 6 (it is quiet): checkpoint 6 does not wait for it
    assert a.ready
    cut = a.cut()
    assert (cut.checkpoint_id, cut.offset, cut.skip, cut.aligned) == (6, 3, {}, True)
    assert cut.quiet == {0: None}
    a.complete(6)
    # a record of channel 0 ends its quiet: its own barrier follows it, and is waited for
    assert a.admit(0, 3) and a.on_record(0, 3, "woke")
    a.admit(1, 4)
    a.on_barrier(1, 4, 7)
    assert not a.ready
    a.admit(0, 5)
    a.on_barrier(0, 5, 7)
    assert a.ready and a.cut().quiet == {}


def test_nothing_to_checkpoint_when_every_channel_is_quiet() -> None:
    a = make(last_checkpoint=4)
    for c in (0, 1):
        a.admit(c, c)
        a.on_barrier(c, c, 5, quiet=True)
    assert a.ready and a.cut().checkpoint_id == 5
    a.complete(5)
    assert not a.ready  # no channel passed anything newer: no checkpoint without a barrier


def test_a_held_record_ends_the_quiet_of_its_channel_when_released() -> None:
    a = make(last_checkpoint=4)
    a.admit(0, 0)
    a.on_barrier(0, 0, 5, quiet=True)
    # a later record of channel 0 (its interval after 5) is held behind the barrier
    assert a.admit(0, 1) and not a.on_record(0, 1, "later")
    a.admit(1, 2)
    a.on_barrier(1, 2, 5)
    assert a.ready
    assert a.cut().quiet == {0: None}  # at the cut, nothing of channel 0 after it is in
    assert a.complete(5) == ["later"]
    a.admit(1, 3)
    a.on_barrier(1, 3, 6)
    assert not a.ready  # channel 0 is not quiet any more: its barrier 6 is awaited


def test_a_stale_quiet_barrier_still_makes_its_channel_quiet() -> None:
    """An upstream task moved to a worker whose clock is behind: its barrier ids are below
    what the channel passed, but what follows it in the partition is what counts."""
    a = make(last_checkpoint=9)
    a.admit(0, 0)
    a.on_barrier(0, 0, 3, quiet=True)
    a.admit(1, 1)
    a.on_barrier(1, 1, 10)
    assert a.ready and a.cut().checkpoint_id == 10


def test_quiet_channels_and_their_watermarks_are_restored() -> None:
    a = make(3, last_checkpoint=4, event_time=True, watermark=100)
    a.admit(0, 0)
    a.on_barrier(0, 0, 5, b"170", quiet=True)
    a.admit(1, 1)
    a.on_barrier(1, 1, 5, b"idle", quiet=True)
    a.admit(2, 2)
    a.on_barrier(2, 2, 5, b"150")
    cut = a.cut()
    assert cut.quiet == {0: 170, 1: None}
    b = make(
        3,
        last_checkpoint=5,
        position=cut.offset,
        event_time=True,
        watermark=150,
        quiet=cut.quiet,
    )
    assert b.watermark() == 150  # min(170, 150); the idle channel does not hold it back
    b.admit(2, 3)
    b.on_barrier(2, 3, 6, b"200")
    assert b.ready and b.watermark() == 170  # the quiet channel still holds its 170


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from(["data", "barrier", "quiet"])),
        min_size=1,
        max_size=60,
    )
)
def test_with_quiet_barriers_a_cut_and_its_replay_cover_every_record_once(
    items: list[tuple[int, str]],
) -> None:
    """The model check above with quiet barriers, over several checkpoints: whatever the
    interleaving, the records in the cut plus the records a restore from it reads again are
    every data record exactly once, and an aligner restored with the cut's quiet channels
    gets as far as the one that ran on."""
    next_id = [1, 1, 1]
    log: list[tuple[int, int | None, bool]] = []
    for ch, kind in items:
        if kind == "data":
            log.append((ch, None, False))
        else:
            log.append((ch, next_id[ch], kind == "quiet"))
            next_id[ch] += 1
    a = make(3)
    processed: list[int] = []
    cuts = []
    for offset, (ch, barrier, quiet) in enumerate(log):
        a.admit(ch, offset)
        if barrier is not None:
            a.on_barrier(ch, offset, barrier, quiet=quiet)
            while a.ready:
                cut = a.cut()
                cuts.append((cut, list(processed)))
                processed += a.complete(cut.checkpoint_id)
        elif a.on_record(ch, offset, offset):
            processed.append(offset)
    data = [o for o, (_, barrier, _) in enumerate(log) if barrier is None]
    taken = [cut.checkpoint_id for cut, _ in cuts]
    for k, (cut, included) in enumerate(cuts):
        b = make(
            3,
            last_checkpoint=cut.checkpoint_id,
            position=cut.offset,
            skip=cut.skip,
            quiet=cut.quiet,
        )
        replayed: list[int] = []
        later: list[int] = []
        for o in range(cut.offset, len(log)):
            ch, barrier, quiet = log[o]
            if not b.admit(ch, o):
                continue
            if barrier is None:
                replayed.append(o)
                b.on_record(ch, o, o)
                continue
            b.on_barrier(ch, o, barrier, quiet=quiet)
            while b.ready:
                later.append(b.cut().checkpoint_id)
                b.complete(later[-1])
        assert sorted(included + replayed) == data
        # restored with the cut's quiet channels, it gets as far as the original: it does not
        # wait for a barrier that a quiet channel will not send. (It may get there sooner: a
        # record of a quiet channel that the original read before the cut and held wakes the
        # channel only when the restored one reads it again, after the cut; see "Quiet
        # channels" in alignment.py on the first records after a wake-up.)
        if taken[k + 1 :]:
            assert later and later[-1] >= taken[-1]
