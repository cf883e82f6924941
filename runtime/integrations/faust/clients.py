"""The Kafka clients of a bridge, configured from the faust app (broker list, credentials).

The bridge writes and commits through its own clients, not faust's: its producer (the task
host's sender: outputs, changelog, barriers, the checkpoint log), the consumer that commits
its checkpoints into the bridge's own group, and a group-less reader for restores. faust's
consumer stays the group member that fetches the records, and :class:`FaustRecord` is how a
record it fetched reaches the task.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

try:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth, server_list
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "headrace.runtime.integrations.faust needs faust-streaming: pip install 'headrace[faust]'"
    ) from exc


def client_kwargs(app: Any) -> dict[str, Any]:
    """Bootstrap servers and credentials as faust's own aiokafka clients get them."""
    conf = app.conf
    return {
        "bootstrap_servers": server_list(conf.broker, 9092),
        **credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
    }


class CheckpointGroup(AIOKafkaConsumer):  # type: ignore[misc]
    """The consumer through which the committer commits the bridge's checkpoints, into the
    bridge's own group (faust's commits carry no metadata and would overwrite them). It never
    joins the group: aiokafka commits for partitions assigned by hand, so each one is assigned
    (and paused: nothing is fetched) before its first commit."""

    async def commit(self, offsets: Any = None) -> None:
        wanted = set(offsets or ())
        have = set(self.assignment())
        if not wanted <= have:
            self.assign(list(have | wanted))
            self.pause(*(have | wanted))
        await super().commit(offsets)


async def stop_reader(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
    """Stop a group-less consumer without hanging.

    aiokafka 0.14's ``stop()`` waits forever for its fetcher when the assignment is empty
    (``restore()`` ends with ``assign([])``) or was just changed and the fetcher still looks up
    committed offsets (a group-less consumer never gets them). One partition with an explicit,
    already resolved position avoids both.
    """
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.stop()


class FaustRecord:
    """A faust message as the task reads it (:class:`~headrace.runtime.task.RawRecord`):
    faust gives timestamps in seconds, headrace in milliseconds."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, msg: Any) -> None:
        self.topic: str = msg.topic
        self.partition: int = msg.partition
        self.offset: int = msg.offset
        ts = msg.timestamp
        self.timestamp = -1 if ts is None else int(ts * 1000)
        self.key: bytes | None = msg.key
        self.value: bytes | None = msg.value
        self.headers = tuple(msg.headers or ())
