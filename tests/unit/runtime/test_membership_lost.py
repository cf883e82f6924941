"""Which failures make a stage drop its tasks and rejoin instead of ending the worker
(runtime/stage_runner.py ``membership_lost``)."""

from __future__ import annotations

from aiokafka.errors import KafkaConnectionError, KafkaError, OutOfOrderSequenceNumber

from headrace.runtime.kafka.lease import ProducerBroken
from headrace.runtime.stage_runner import membership_lost


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as raised:
        return raised


def test_aiokafkas_dead_transactional_sender_after_a_lost_connection_drops_and_rejoins() -> None:
    """What aiokafka 0.14 raises when the broker goes away while the sender looks up the
    group coordinator for an offset commit (seen in CI): KafkaError from KafkaError from
    KafkaConnectionError."""
    lookup = _chained(KafkaError(repr(KafkaConnectionError())), KafkaConnectionError())
    delivery = _chained(KafkaError("Unexpected error during batch delivery"), lookup)
    assert membership_lost(delivery)


def test_producer_state_lost_drops_and_rejoins_other_errors_end_the_worker() -> None:
    assert membership_lost(OutOfOrderSequenceNumber())
    assert membership_lost(ProducerBroken("a batch failed"))
    assert not membership_lost(KafkaError("something else"))
    assert not membership_lost(_chained(KafkaError("wrapped"), ValueError("a bug")))
    assert not membership_lost(ValueError("a bug"))
