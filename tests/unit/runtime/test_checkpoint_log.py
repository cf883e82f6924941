"""When a checkpoint counts as complete for the whole job (runtime/checkpoint/log.py)."""

from __future__ import annotations

from headrace.runtime.checkpoint.log import CheckpointAck, summarize

TASKS = {"stage0/0", "stage0/1", "stage1/0"}


def _ack(task: str, checkpoint_id: int, *, aligned: bool = True) -> CheckpointAck:
    stage, partition = task.split("/")
    return CheckpointAck("wc", stage, int(partition), checkpoint_id, {}, aligned=aligned)


def test_a_task_that_skipped_its_ack_or_acknowledged_a_later_checkpoint_completes_it() -> None:
    """stage0/1 finished its input after checkpoint 10 (idle: no more acks); stage0/0 skipped
    11 (nothing new) and acknowledged 12; stage1/0 acknowledged everything."""
    acks = [
        _ack("stage0/0", 10),
        _ack("stage0/1", 10),
        _ack("stage1/0", 10),
        _ack("stage1/0", 11, aligned=False),
        _ack("stage0/0", 12),
        _ack("stage1/0", 12),
    ]
    summaries = summarize(acks, TASKS)
    assert [s.checkpoint_id for s in summaries] == [12, 11, 10]
    by_id = {s.checkpoint_id: s for s in summaries}
    assert not by_id[12].complete and not by_id[11].complete  # stage0/1 never got past 10
    assert by_id[10].complete and by_id[10].acked == TASKS
    assert by_id[11].acked == {"stage1/0"} and not by_id[11].aligned

    acks.append(_ack("stage0/1", 13))  # stage0/1 has input again
    by_id = {s.checkpoint_id: s for s in summarize(acks, TASKS)}
    assert by_id[12].complete and by_id[12].acked == {"stage0/0", "stage1/0"}
    assert by_id[11].complete  # every task acknowledged it or a later one
    assert not by_id[13].complete


def test_a_task_without_any_ack_keeps_every_checkpoint_incomplete() -> None:
    acks = [_ack("stage0/0", 5), _ack("stage0/1", 5)]
    assert not any(s.complete for s in summarize(acks, TASKS))
