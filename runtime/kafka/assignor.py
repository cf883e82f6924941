"""The task-input groups' partition assignor: co-partitioned, balanced and sticky.

A stage's group assigns *tasks*: partition ``p`` of every input topic goes to one member (the
range assignor did that too). What the range assignor did not do is keep tasks where they are:
it lays the partitions out over the members sorted by member id, and member ids are new at every
join, so adding a fourth worker to three moved most tasks, each one a final checkpoint, a
restore from its changelog (or, with RocksDB, a store opened elsewhere) and a new transactional
producer. With this assignor a member keeps the tasks it owned, up to its fair share: adding a
member moves about ``1/members`` of the tasks, and a revoked task that comes straight back is
resumed from memory (``StageRunner._resume_suspended``) instead of being restored. Kafka
Streams' sticky task assignor and faust's assignor do the same, for the same reason.

Protocol. Each member sends the tasks of its last assignment in its JoinGroup metadata
(``user_data``: ``{"v": 1, "owned": [...]}``, JSON). The leader computes :func:`sticky_plan`:
quotas of ``tasks // members`` or one more (the larger ones to the members that owned the
most), each member keeps what it owned up to its quota (a task two members claim goes to the
first in that order), and the rest fill the members below quota in task order. The plan only
decides *where* a task runs: ownership is still proven by the checkpoint protocol (fenced
transactions, leases and writer epochs), so a wrong hint can only cost a move, never state.

Compatibility: the protocol is called ``range``. A group agrees on a protocol every member
offers, and members of a version before this one offer only the range assignor; a new member
that offered only a new name could not join a group that still has old members (a rolling
deployment would stall on it). Offering both does not work either: aiokafka sends one JoinGroup
per offered assignor, each with a longer protocol list, and the coordinator takes the second as
changed metadata and rebalances: each member's second JoinGroup landed after the other's join
had completed, generation after generation every heartbeat, for ever (a two-worker word count
ran 50 generations in 40 s with half its input unprocessed). So this assignor takes the range
assignor's name and wire format (the claims travel in ``user_data``, which the range assignor
ignores): while an old member leads, the group is assigned by range; once a new member leads, it
is sticky. Members whose subscriptions differ (never the case for a headrace stage) are assigned
by range too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import orjson
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

log = logging.getLogger(__name__)

#: the format of the owned tasks in a member's ``user_data``
USER_DATA_VERSION = 1


def encode_owned(owned: Iterable[int]) -> bytes:
    return orjson.dumps({"v": USER_DATA_VERSION, "owned": sorted(owned)})


def decode_owned(user_data: bytes | None) -> list[int]:
    """The tasks a member says it owned; nothing for data this version cannot read (an
    empty or foreign ``user_data``): the member then only gets its fair share."""
    if not user_data:
        return []
    try:
        doc = orjson.loads(user_data)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(doc, dict) or doc.get("v") != USER_DATA_VERSION:
        return []
    owned = doc.get("owned")
    if not isinstance(owned, list):
        return []
    return [p for p in owned if isinstance(p, int) and not isinstance(p, bool)]


def sticky_plan(tasks: Sequence[int], owned: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Tasks per member: every task exactly once, counts differing by at most one, and each
    member keeping as many of the tasks it owned as its quota allows. Deterministic: every
    leader computes the same plan from the same members and claims."""
    members = sorted(owned)
    if not members:
        return {}
    valid = set(tasks)
    previous = {m: sorted(set(owned[m]) & valid) for m in members}
    base, extra = divmod(len(valid), len(members))
    # the larger quotas go to the members that owned the most: the fewest tasks move
    order = sorted(members, key=lambda m: (-len(previous[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(order)}
    plan: dict[str, list[int]] = {m: [] for m in members}
    taken: set[int] = set()
    for m in order:
        kept = plan[m]
        for p in previous[m]:
            if len(kept) >= quota[m]:
                break
            if p not in taken:
                taken.add(p)
                kept.append(p)
    free = iter(sorted(valid - taken))
    for m in order:
        kept = plan[m]
        while len(kept) < quota[m]:
            kept.append(next(free))
    return {m: sorted(ps) for m, ps in plan.items()}


class StickyTaskAssignor:
    """One per group consumer: it remembers that member's last assignment (aiokafka calls
    ``metadata``, ``assign`` and ``on_assignment`` on the object it was given, so an instance
    can hold state; the class-level assignors aiokafka ships cannot)."""

    #: the range assignor's name and metadata version (module docstring, "Compatibility")
    name = RangePartitionAssignor.name
    version = RangePartitionAssignor.version

    def __init__(self) -> None:
        self.owned: list[int] = []

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), encode_owned(self.owned)
        )

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.owned = sorted({p for _topic, partitions in assignment.assignment for p in partitions})

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        subscriptions = {m: tuple(sorted(md.subscription)) for m, md in members.items()}
        if len(set(subscriptions.values())) > 1:
            log.warning(
                "members of one group subscribe to different topics (%s): range assignment",
                sorted(set(subscriptions.values())),
            )
            fallback: dict[str, ConsumerProtocolMemberAssignment]
            fallback = RangePartitionAssignor.assign(cluster, members)
            return fallback
        topics = next(iter(subscriptions.values()), ())
        partitions: dict[str, set[int]] = {}
        for topic in topics:
            found = cluster.partitions_for_topic(topic)
            if found is None:
                log.warning("no partition metadata for topic %s", topic)
                continue
            partitions[topic] = set(found)
        tasks = sorted(set().union(*partitions.values()))
        plan = sticky_plan(tasks, {m: decode_owned(md.user_data) for m, md in members.items()})
        return {
            m: ConsumerProtocolMemberAssignment(
                self.version,
                [
                    (topic, [p for p in plan[m] if p in partitions[topic]])
                    for topic in sorted(partitions)
                ],
                b"",
            )
            for m in members
        }
