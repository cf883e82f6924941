"""Upgrading from the first faust bridge, whose checkpoints lived in the changelog.

The first bridge (headrace before the task host) ended every checkpoint of partition *p* with a
**marker** in changelog partition *p*: a store metadata key ``faust.checkpoint`` whose value is
``{"v": 1, "cp": id, "next": X, "seen": {...}}`` (*X*: the next source offset; ``seen``: its
own hop dedupe, ``hr.fseq``), and it committed *X* into faust's group, with no metadata. The
bridge now keeps its checkpoints where a headrace worker does: offsets and metadata in its own
group ``<app id>.<name>``.

Why this module exists: after an upgrade that group is empty while the changelog still holds
the state. Taken as "no checkpoint", an at-least-once restore treats every changelog record as
never committed and rewrites those keys as deleted at the next checkpoint: the state would be
erased **silently**. So, for a task whose group has no committed offset:

* a **source-fed** bridge whose changelog partition ends with a marker takes that marker as its
  committed checkpoint: resume at *X*, with the changelog valid up to the marker's offset (the
  records after it belong to a checkpoint that never completed, exactly as before). The first
  checkpoint after the upgrade commits into the bridge's group, and the marker is not read
  again;
* a **hop-fed** bridge (it reads what another bridge writes) with a marker is refused: its
  ``seen`` marks number the old ``hr.fseq`` headers, and the records still in the hop topic
  carry neither ``hr.ch`` nor ``hr.seq``, so nothing can tell which of them the state holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.state.keys import StatePartitionKey, encode_metadata_key

log = logging.getLogger("headrace.runtime.integrations.faust")

#: the store metadata name of the first bridge's checkpoint marker
MARKER_NAME = "faust.checkpoint"
MARKER_FORMAT = 1


class LegacyCheckpointError(RuntimeError):
    """A bridge cannot take over the checkpoint the first bridge format left behind."""


@dataclass(frozen=True, slots=True)
class LegacyMarker:
    """The last checkpoint marker of one changelog partition."""

    offset: int  #: the marker's changelog offset: the checkpoint includes records up to it
    checkpoint_id: int
    next_offset: int  #: the first source offset the checkpoint does not contain

    def committed(self, operator_id: str) -> tuple[int, str]:
        """The (offset, metadata) the bridge's group would hold for this checkpoint."""
        meta = CheckpointMetadata(self.checkpoint_id, changelog_offsets={operator_id: self.offset})
        return self.next_offset, meta.encode()


def marker_key(operator_id: str, partition: int) -> bytes:
    return encode_metadata_key(StatePartitionKey(operator_id, partition, partition), MARKER_NAME)


async def last_markers(
    reader: AIOKafkaConsumer, changelog: str, operator_id: str, partitions: list[int]
) -> dict[int, LegacyMarker]:
    """The last marker per changelog partition, for the partitions that have one.

    Every old checkpoint ended with its marker, so the last one is near the end: read backwards
    in growing windows. Compaction keeps the newest marker (the newest record of its key). A
    partition written only by the current bridge has no marker and costs one window's read.
    """
    found: dict[int, LegacyMarker] = {}
    tps = [TopicPartition(changelog, p) for p in partitions]
    reader.assign(tps)
    lows = await reader.beginning_offsets(tps)
    highs = await reader.end_offsets(tps)
    for tp in tps:
        key = marker_key(operator_id, tp.partition)
        low, high = lows[tp], highs[tp]
        reader.assign([tp])
        last: tuple[int, bytes] | None = None
        window = 1024
        while last is None and high > low:
            start = max(low, high - window)
            reader.seek(tp, start)
            while await reader.position(tp) < high:
                batch = await reader.getmany(tp, timeout_ms=1000, max_records=10_000)
                for r in batch.get(tp, []):
                    found_newer = last is None or r.offset > last[0]
                    if r.offset < high and r.key == key and r.value is not None and found_newer:
                        last = (r.offset, bytes(r.value))
            high, window = start, window * 8
        if last is None:
            continue
        offset, raw = last
        try:
            doc = orjson.loads(raw)
            if doc.get("v") != MARKER_FORMAT or doc.get("next") is None:
                raise ValueError(f"format {doc.get('v')!r}, next {doc.get('next')!r}")
            found[tp.partition] = LegacyMarker(offset, int(doc["cp"]), int(doc["next"]))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise LegacyCheckpointError(
                f"{changelog}[{tp.partition}] offset {offset}: a checkpoint marker of the first "
                f"faust bridge that cannot be read ({exc}); refusing to guess where its state ends"
            ) from exc
    return found


async def adopt_legacy_checkpoints(
    reader: AIOKafkaConsumer,
    *,
    bridge: str,
    source: str,
    changelog: str,
    operator_id: str,
    hop_fed: bool,
    committed: dict[tuple[str, int], tuple[int, str | None]],
    partitions: list[int],
) -> list[int]:
    """Fill ``committed`` for the ``partitions`` without a committed offset from the first
    bridge's markers (see the module docstring); returns the partitions taken over."""
    missing = [p for p in partitions if (source, p) not in committed]
    if not missing:
        return []
    markers = await last_markers(reader, changelog, operator_id, missing)
    if markers and hop_fed:
        raise LegacyCheckpointError(
            f"headrace[{bridge}]: changelog {changelog} partition(s) {sorted(markers)} hold state "
            "checkpointed by the first faust bridge format (a 'faust.checkpoint' marker), and "
            f"this bridge reads {source!r}, which another bridge writes: the old hop dedupe "
            "(hr.fseq) cannot be carried over, so the records still in that topic cannot be "
            "matched with the state. Nothing was consumed. To upgrade, start this bridge from "
            f"scratch: stop the app, delete {changelog!r}, and reset faust's offsets of "
            f"{source!r} and of the topic the upstream bridge reads to where the rebuilt state "
            "should begin (or keep the previous headrace for this app)"
        )
    for p, marker in sorted(markers.items()):
        committed[(source, p)] = marker.committed(operator_id)
        log.warning(
            "headrace[%s]: partition %d: taking over the checkpoint of the first bridge format "
            "(marker at %s[%d] offset %d, checkpoint %d): resuming at source offset %d; the "
            "next checkpoint is committed into the bridge's group",
            bridge,
            p,
            changelog,
            p,
            marker.offset,
            marker.checkpoint_id,
            marker.next_offset,
        )
    return sorted(markers)
