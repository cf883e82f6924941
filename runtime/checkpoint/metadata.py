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
* ``cl``: per stateful operator, the changelog offset after this checkpoint's writes. Under
  at-least-once the changelog may hold writes of a checkpoint that never committed its offsets;
  restore treats records past ``cl`` as stale (ARCHITECTURE.md section 5.5).

The encoding is compact JSON; Kafka's default limit (``offset.metadata.max.bytes``) is 4096.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

FORMAT = 1


@dataclass(frozen=True, slots=True)
class CheckpointMetadata:
    checkpoint_id: int
    skip: dict[int, int] = field(default_factory=dict)
    changelog_offsets: dict[str, int] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)

    def encode(self) -> str:
        doc: dict[str, object] = {"v": FORMAT, "cp": self.checkpoint_id}
        if self.skip:
            doc["skip"] = {str(c): x for c, x in self.skip.items()}
        if self.changelog_offsets:
            doc["cl"] = self.changelog_offsets
        if self.seen:
            doc["seen"] = {str(c): x for c, x in self.seen.items()}
        return orjson.dumps(doc).decode()

    @classmethod
    def decode(cls, text: str | None) -> CheckpointMetadata | None:
        """None for an offset committed by something other than headrace."""
        if not text:
            return None
        try:
            doc = orjson.loads(text)
            if not isinstance(doc, dict) or doc.get("v") != FORMAT:
                return None
            return cls(
                int(doc["cp"]),
                {int(c): int(x) for c, x in doc.get("skip", {}).items()},
                {str(k): int(v) for k, v in doc.get("cl", {}).items()},
                {int(c): int(x) for c, x in doc.get("seen", {}).items()},
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
