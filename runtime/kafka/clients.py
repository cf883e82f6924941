"""Every Kafka client the runtime makes, built from :class:`~headrace.runtime.config.Settings`.

One place decides the flags that must agree across clients: connection and security settings
(SASL/SSL pass through unchanged, secrets never logged), the isolation level that follows the
processing guarantee (``read_committed`` under exactly-once, so aborted transactions stay
invisible to task inputs, restores and inspection alike), no auto-commit (offsets are committed
by checkpoints only), reading from the earliest offset when nothing is committed, and the
producer settings of durable writes (``acks=all``, idempotence).
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from headrace.runtime.config import Settings

__all__ = ["PRODUCER_SETTINGS", "admin_client", "group_consumer", "producer", "reader"]

#: durable writes: every in-sync replica acknowledges, idempotent retries, batched sends
PRODUCER_SETTINGS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    "max_batch_size": 512 * 1024,
}


def _isolation(settings: Settings, committed_only: bool | None) -> str:
    committed = settings.exactly_once if committed_only is None else committed_only
    return "read_committed" if committed else "read_uncommitted"


def group_consumer(settings: Settings, group_id: str, *, client_id: str) -> AIOKafkaConsumer:
    """A task-input consumer: a member of ``group_id`` that commits only through checkpoints.

    The range assignor keeps partition ``p`` of co-partitioned inputs on one member; the
    session timeout is also the member's write lease (:mod:`headrace.runtime.kafka.lease`).
    """
    return AIOKafkaConsumer(
        **settings.kafka_kwargs(),
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=_isolation(settings, None),
        partition_assignment_strategy=(RangePartitionAssignor,),
        max_partition_fetch_bytes=4 * 1024 * 1024,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )


def reader(
    settings: Settings,
    *,
    client_id: str,
    committed_only: bool | None = None,
    max_partition_fetch_bytes: int = 8 * 1024 * 1024,
) -> AIOKafkaConsumer:
    """A group-less consumer that reads assigned partitions (restores, inspection).

    ``committed_only`` defaults to the guarantee's isolation level.
    """
    return AIOKafkaConsumer(
        **settings.kafka_kwargs(),
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=_isolation(settings, committed_only),
        max_partition_fetch_bytes=max_partition_fetch_bytes,
    )


def producer(
    settings: Settings, *, client_id: str, transactional_id: str | None = None
) -> AIOKafkaProducer:
    """A durable producer; with ``transactional_id``, a task's exactly-once producer."""
    extra: dict[str, Any] = {}
    if transactional_id is not None:
        extra["transactional_id"] = transactional_id
    return AIOKafkaProducer(
        **settings.kafka_kwargs(), client_id=client_id, **PRODUCER_SETTINGS, **extra
    )


def admin_client(settings: Settings, *, client_id: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**settings.kafka_kwargs(), client_id=client_id)
