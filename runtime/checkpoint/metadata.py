"""What a checkpoint stores next to the committed input offset.

Kafka keeps a free-text ``metadata`` string with every committed offset, atomically with the
offset (inside the transaction under exactly-once). headrace stores there what it needs to
restore a task exactly, so that no extra topic has to agree with the offsets:

* ``cp``: the checkpoint id;
* ``skip``: per upstream channel, the first offset of that channel not in the checkpoint, for
  channels whose cut lies past the committed offset (see
  :mod:`headrace.runtime.checkpoint.alignment`);
* ``seen``: at-least-once only, per (channel, input topic) slot the highest repartition
  sequence number processed (see :mod:`headrace.runtime.checkpoint.barrier`);
* ``wm``: event-time jobs only, the task's watermark at the cut (a restored task goes on from
  it; see :mod:`headrace.runtime.task.timers`);
* ``q``: the upstream channels that were quiet at the cut, as a hexadecimal bit mask (bit ``c``
  for channel ``c``), and ``qwm`` (event-time jobs) their watermarks in channel order, ``null``
  for idle: a quiet channel sends no barrier until it sends data, so a restored task must know
  not to wait for one (:mod:`headrace.runtime.checkpoint.alignment`, "Quiet channels");
* ``lo``: exactly-once, a stage with a repartition output: the downstream partitions whose last
  barrier from this task was not quiet, as a bit mask. The next owner goes on from it instead
  of sending a barrier to every partition (aborted writes are invisible, so the committed
  barriers are all a downstream task has seen). Absent: unknown, a full round;
* ``cl``: per stateful operator, the changelog offset after this checkpoint's writes. Under
  at-least-once the changelog may hold writes of a checkpoint that never committed its offsets;
  restore treats records past ``cl`` as stale (ARCHITECTURE.md section 5.5).

The encoding is compact JSON. Kafka refuses metadata longer than ``offset.metadata.max.bytes``
(4096 by default), and ``skip`` and ``seen`` grow with the number of upstream partitions (256
of them take about 10 KB). A checkpoint whose document would not fit :data:`METADATA_LIMIT`
*spills* it (:mod:`headrace.runtime.checkpoint.commit`): the whole document is written as a
record to the stage's compacted ``<job>.<stage>.cuts`` topic, in the same transaction under
exactly-once and acknowledged before the offsets are committed under at-least-once, and the
offset metadata holds only a reference to it (``x``: that record's offset). The reference is
committed atomically with the offsets, exactly like the document itself would be, and a
restore reads the record it names (:meth:`headrace.runtime.host.StageHost.restore`).

Reading it back distinguishes two cases that must never be confused (issue "exact under
change"): metadata that is not headrace's (empty, as Kafka's own tools leave it after
``kafka-consumer-groups --reset-offsets``, or foreign text) decodes to ``None``; metadata that is
headrace's but cannot be read (an unknown format version, a damaged document) raises
:class:`CheckpointMetadataError`. The caller decides what ``None`` means for state (see
:meth:`headrace.runtime.host.StageHost.start_point`); an unreadable headrace document is never
taken for "no checkpoint", because that would treat the whole changelog as stale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

FORMAT = 1

#: the longest metadata headrace commits; a longer document is spilled (broker default 4096,
#: with room for the reference and for brokers that count in bytes)
METADATA_LIMIT = 3_500


class CheckpointMetadataError(ValueError):
    """Offset metadata written by headrace that this version cannot read."""


@dataclass(frozen=True, slots=True)
class CheckpointMetadata:
    checkpoint_id: int
    skip: dict[int, int] = field(default_factory=dict)
    changelog_offsets: dict[str, int] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    #: the offset, in the stage's cuts topic, of the record holding this checkpoint's whole
    #: document (None: the metadata holds it); see the module docstring
    spilled_at: int | None = None
    #: the task's watermark at the cut (event-time jobs)
    watermark: int | None = None
    #: upstream channels quiet at the cut -> their watermark (event-time jobs; else None)
    quiet: dict[int, int | None] = field(default_factory=dict)
    #: downstream partitions whose last barrier was not quiet (None: not recorded)
    loud: frozenset[int] | None = None

    @staticmethod
    def reference(checkpoint_id: int, offset: int) -> str:
        """The offset metadata of a spilled checkpoint."""
        return orjson.dumps({"v": FORMAT, "cp": checkpoint_id, "x": offset}).decode()

    def encode(self) -> str:
        doc: dict[str, object] = {"v": FORMAT, "cp": self.checkpoint_id}
        if self.skip:
            doc["skip"] = {str(c): x for c, x in self.skip.items()}
        if self.changelog_offsets:
            doc["cl"] = self.changelog_offsets
        if self.seen:
            doc["seen"] = {str(c): x for c, x in self.seen.items()}
        if self.watermark is not None:
            doc["wm"] = self.watermark
        if self.quiet:
            channels = sorted(self.quiet)
            doc["q"] = _mask(channels)
            if any(self.quiet[c] is not None for c in channels):
                doc["qwm"] = [self.quiet[c] for c in channels]
        if self.loud is not None:
            doc["lo"] = _mask(self.loud)
        return orjson.dumps(doc).decode()

    @staticmethod
    def _quiet(doc: dict[str, object]) -> dict[int, int | None]:
        channels = _unmask(str(doc.get("q", "0")))
        watermarks = doc.get("qwm")
        if watermarks is None:
            return dict.fromkeys(channels)
        if not isinstance(watermarks, list) or len(watermarks) != len(channels):
            raise ValueError(f"qwm {watermarks!r} does not match the quiet channels {channels}")
        return {c: None if w is None else int(w) for c, w in zip(channels, watermarks, strict=True)}

    @classmethod
    def decode(cls, text: str | None) -> CheckpointMetadata | None:
        """None for an offset committed without headrace metadata (empty, or text that is not
        a headrace document); :class:`CheckpointMetadataError` for a headrace document this
        version cannot read (another format version, or damaged)."""
        if not text:
            return None
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or "v" not in doc or "cp" not in doc:
            return None
        if doc["v"] != FORMAT:
            raise CheckpointMetadataError(
                f"checkpoint metadata of format version {doc['v']!r}; this headrace reads "
                f"version {FORMAT} (was the group committed by a newer headrace?)"
            )
        try:
            if "x" in doc:
                return cls(int(doc["cp"]), spilled_at=int(doc["x"]))
            return cls(
                int(doc["cp"]),
                {int(c): int(x) for c, x in doc.get("skip", {}).items()},
                {str(k): int(v) for k, v in doc.get("cl", {}).items()},
                {int(c): int(x) for c, x in doc.get("seen", {}).items()},
                watermark=None if doc.get("wm") is None else int(doc["wm"]),
                quiet=cls._quiet(doc),
                loud=None if "lo" not in doc else frozenset(_unmask(str(doc["lo"]))),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointMetadataError(
                f"damaged checkpoint metadata {text[:200]!r}: {exc}"
            ) from exc


def _mask(channels: Iterable[int]) -> str:
    """A set of small non-negative integers as a hexadecimal bit mask (bit ``c`` for ``c``)."""
    return format(sum(1 << c for c in set(channels)), "x")


def _unmask(text: str) -> list[int]:
    mask = int(text, 16)
    return [c for c in range(mask.bit_length()) if mask >> c & 1]
