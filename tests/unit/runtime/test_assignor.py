"""The sticky task assignor (runtime/kafka/assignor.py): every task once, balanced, and tasks
stay with the member that owned them up to its fair share."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.runtime.kafka.assignor import (
    StickyTaskAssignor,
    decode_owned,
    encode_owned,
    sticky_plan,
)

member_ids = st.lists(
    st.text("abcdefgh", min_size=1, max_size=6), min_size=1, max_size=7, unique=True
)


def owners(plan: dict[str, list[int]]) -> dict[int, str]:
    return {p: m for m, ps in plan.items() for p in ps}


def assert_valid(plan: dict[str, list[int]], tasks: int, members: list[str]) -> None:
    counts = Counter(p for ps in plan.values() for p in ps)
    assert sorted(counts) == list(range(tasks)), "every task exactly once"
    assert set(counts.values()) <= {1}
    sizes = [len(plan[m]) for m in members]
    assert max(sizes) - min(sizes) <= 1, sizes


@settings(max_examples=300, deadline=None)
@given(tasks=st.integers(0, 70), members=member_ids, data=st.data())
def test_any_claims_give_every_task_once_and_balanced_shares(
    tasks: int, members: list[str], data: st.DataObject
) -> None:
    # claims may overlap, name tasks that do not exist, or be empty (a new member)
    claims = {
        m: data.draw(st.lists(st.integers(-2, tasks + 3), max_size=tasks + 2)) for m in members
    }
    plan = sticky_plan(range(tasks), claims)
    assert set(plan) == set(members)
    assert_valid(plan, tasks, members)
    # the same plan whatever order the members came in (every leader computes the same)
    assert sticky_plan(range(tasks), dict(reversed(list(claims.items())))) == plan


@settings(max_examples=300, deadline=None)
@given(tasks=st.integers(1, 70), members=member_ids, data=st.data())
def test_disjoint_claims_are_kept_up_to_the_quota(
    tasks: int, members: list[str], data: st.DataObject
) -> None:
    """What each member owned stays with it, except what it must give up to be balanced."""
    owner = {p: data.draw(st.sampled_from([*members, None])) for p in range(tasks)}
    claims = {m: [p for p, o in owner.items() if o == m] for m in members}
    plan = sticky_plan(range(tasks), claims)
    base = tasks // len(members)
    for m in members:
        kept = set(plan[m]) & set(claims[m])
        assert len(kept) == min(len(claims[m]), len(plan[m]))
        assert len(plan[m]) in (base, base + 1)


@settings(max_examples=200, deadline=None)
@given(tasks=st.integers(1, 300), before=st.integers(1, 6))
def test_a_join_moves_only_the_new_members_share(tasks: int, before: int) -> None:
    """Scaling from ``before`` to ``before + 1`` members moves ~1/(before+1) of the tasks (the
    range assignor moved most of them: member ids change order); a leave moves only the
    leaving member's tasks."""
    members = [f"m{i}" for i in range(before)]
    plan = sticky_plan(range(tasks), {m: [] for m in members})
    joined = sticky_plan(range(tasks), {**plan, "new": []})
    assert_valid(joined, tasks, [*members, "new"])
    was, now = owners(plan), owners(joined)
    moved = [p for p in range(tasks) if was[p] != now[p]]
    assert sorted(moved) == joined["new"]

    left = sticky_plan(range(tasks), {m: ps for m, ps in joined.items() if m != "m0"})
    moved = [p for p in range(tasks) if now[p] != owners(left)[p]]
    assert sorted(moved) == joined["m0"]


def test_the_first_plans_of_a_start_with_four_workers() -> None:
    """Four workers joining one after the other at 256 partitions."""
    plan = sticky_plan(range(256), {"a": []})
    assert plan == {"a": list(range(256))}
    plan = sticky_plan(range(256), {**plan, "b": []})
    assert [len(plan["a"]), len(plan["b"])] == [128, 128]
    assert plan["a"] == list(range(128))
    plan = sticky_plan(range(256), {**plan, "c": [], "d": []})
    assert sorted(len(ps) for ps in plan.values()) == [64, 64, 64, 64]
    assert set(plan["a"]) <= set(range(128)) and set(plan["b"]) <= set(range(128, 256))


def test_owned_tasks_travel_in_user_data_and_garbage_claims_nothing() -> None:
    assert decode_owned(encode_owned([3, 1, 2])) == [1, 2, 3]
    for junk in (b"", None, b"\x00\x01", b"[1, 2]", b'{"v": 99, "owned": [1]}', b'{"v": 1}'):
        assert decode_owned(junk) == []
    assert decode_owned(b'{"v": 1, "owned": [1, "x", true, 2]}') == [1, 2]


@dataclass
class _Cluster:
    topics: dict[str, int]

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.topics.get(topic)
        return None if n is None else set(range(n))


def _members(assignors: dict[str, StickyTaskAssignor], topics: list[str]) -> dict[str, object]:
    return {
        m: ConsumerProtocolMemberMetadata.decode(a.metadata(topics).encode())
        for m, a in assignors.items()
    }


def test_the_assignor_keeps_co_partitioned_inputs_together_across_rebalances() -> None:
    cluster = _Cluster({"orders": 6, "payments": 6})
    topics = ["payments", "orders"]
    assignors = {"w1": StickyTaskAssignor()}
    history = []
    for joining in ("w2", "w3"):
        # each generation: the leader assigns, every member is told its share (on the wire)
        result = assignors["w1"].assign(cluster, _members(assignors, topics))  # type: ignore[arg-type]
        for m, assignment in result.items():
            decoded = ConsumerProtocolMemberAssignment.decode(assignment.encode())
            per_topic = dict(decoded.assignment)
            assert set(per_topic) == {"orders", "payments"}
            assert per_topic["orders"] == per_topic["payments"], "partition p of every input"
            assignors[m].on_assignment(decoded)
        history.append({m: a.owned for m, a in assignors.items()})
        assignors[joining] = StickyTaskAssignor()
    assert history[0] == {"w1": [0, 1, 2, 3, 4, 5]}
    assert history[1]["w1"] == [0, 1, 2]  # kept half, the newcomer took the rest
    assert history[1]["w2"] == [3, 4, 5]


def test_members_with_different_subscriptions_get_the_range_assignment() -> None:
    cluster = _Cluster({"a": 4, "b": 4})
    one, two = StickyTaskAssignor(), StickyTaskAssignor()
    members = {
        "m1": ConsumerProtocolMemberMetadata.decode(one.metadata(["a"]).encode()),
        "m2": ConsumerProtocolMemberMetadata.decode(two.metadata(["a", "b"]).encode()),
    }
    result = one.assign(cluster, members)  # type: ignore[arg-type]
    got = {m: dict(a.assignment) for m, a in result.items()}
    assert sorted(got["m1"]["a"] + got["m2"]["a"]) == [0, 1, 2, 3]
    assert got["m2"]["b"] == [0, 1, 2, 3]


async def test_a_group_consumer_offers_one_assignor() -> None:
    """aiokafka sends one JoinGroup per offered assignor (each with a longer protocol list);
    the coordinator takes the second as changed metadata and rebalances: two workers did so
    every heartbeat, for ever. The one assignor speaks the range assignor's protocol, so that
    members of an older version still share it."""
    from headrace.runtime.config import Settings
    from headrace.runtime.kafka import clients

    consumer = clients.group_consumer(
        Settings(bootstrap_servers="127.0.0.1:9"), "group", client_id="test"
    )
    strategies = consumer._partition_assignment_strategy
    await consumer.stop()  # never started: closes nothing but the object
    assert len(strategies) == 1
    assert isinstance(strategies[0], StickyTaskAssignor)
    assert strategies[0].name == "range"
