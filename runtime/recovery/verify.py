"""Checking a job's output and state against a deterministic replay of its input.

The recovery invariant (ARCHITECTURE.md section 6) is checked from the outside, with nothing but
Kafka: the input that was actually produced is read back, a *replay function* computes what a
failure-free run outputs for it (per key, the sequence of output values), and that is compared
with the job's output topic (read ``read_committed``) and with the final state rebuilt from the
job's changelog.

* ``exactly_once``: per key, the output values are exactly the replayed sequence (no gap, no
  repeat, same order) and the final state equals the replay's last value per key.
* ``at_least_once``: the final state equals the replay; the output may repeat values (a replay
  after a crash) but never skips one: every replayed value appears and the last value seen per
  key is the replay's last value. A value the replay never produces (e.g. a count above the
  real count) is a state error, not a repeat.

For word count the replay is :func:`wordcount_replay`: per word, ``1..count``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.structs import TopicPartition

from headrace.operators.job import Job
from headrace.operators.serde import INT, STR, Serde
from headrace.runtime.checkpoint.log import CheckpointSummary
from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.config import Settings
from headrace.runtime.inspect import operator_states, partition_count, read_all, read_checkpoints

__all__ = [
    "Expected",
    "Observed",
    "Report",
    "VerificationError",
    "Verifier",
    "check_at_least_once",
    "check_exactly_once",
    "check_state",
    "read_final_state",
    "read_topic",
    "wait_changelog_committed",
    "wait_complete_checkpoint",
    "wordcount_replay",
    "wordcount_verifier",
]

#: key -> the output values a failure-free run writes for that key, in order
Expected = dict[Any, list[Any]]
#: key -> the output values found in the output topic, in offset order
Observed = dict[Any, list[Any]]
Replay = Callable[[Sequence[Any]], Expected]


class VerificationError(AssertionError):
    """The output or state differs from the deterministic replay."""


def wordcount_replay(lines: Sequence[Any]) -> Expected:
    """Word count's failure-free output: per lower-cased word, the counts ``1..n``."""
    counts: Counter[str] = Counter()
    for line in lines:
        text = line.decode() if isinstance(line, bytes) else str(line)
        counts.update(text.lower().split())
    return {w: list(range(1, n + 1)) for w, n in counts.items()}


@dataclass
class Report:
    """What a verification found; ``problems`` is empty when the invariant holds."""

    guarantee: str
    keys: int = 0
    expected_records: int = 0
    observed_records: int = 0
    #: output records beyond the replay (at-least-once repeats; always 0 under exactly-once)
    repeats: int = 0
    state_checked: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{self.guarantee}: {self.keys} keys, {self.expected_records} expected output "
            f"records, {self.observed_records} observed ({self.repeats} repeats), state "
            f"{'checked' if self.state_checked else 'not checked'}"
        )
        if self.ok:
            return head + ": OK"
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"{head}: {len(self.problems)} problem(s)\n  {shown}{more}"

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerificationError(self.summary())


# --------------------------------------------------------------------------------------
# pure checks
# --------------------------------------------------------------------------------------


def check_exactly_once(
    expected: Mapping[Any, list[Any]], observed: Mapping[Any, list[Any]]
) -> list[str]:
    """Per key the output must be exactly the replayed sequence."""
    problems: list[str] = []
    for key in sorted(set(expected) | set(observed), key=repr):
        want, got = expected.get(key, []), observed.get(key, [])
        if want == got:
            continue
        if not want:
            problems.append(f"key {key!r}: output {_short(got)} but the replay has none")
            continue
        dupes = [v for v, n in Counter(got).items() if n > 1]
        missing = [v for v in want if v not in got]
        extra = [v for v in got if v not in want]
        what = []
        if dupes:
            what.append(f"repeated {_short(dupes)}")
        if missing:
            what.append(f"missing {_short(missing)}")
        if extra:
            what.append(f"values the replay never produces {_short(extra)}")
        if not what:
            what.append("out of order")
        problems.append(
            f"key {key!r}: {', '.join(what)} (expected {_short(want)}, got {_short(got)})"
        )
    return problems


def check_at_least_once(
    expected: Mapping[Any, list[Any]], observed: Mapping[Any, list[Any]]
) -> list[str]:
    """Repeats allowed; no value may be missing or unknown, and the last value must be final."""
    problems: list[str] = []
    for key in sorted(set(expected) | set(observed), key=repr):
        want, got = expected.get(key, []), observed.get(key, [])
        if not want:
            problems.append(f"key {key!r}: output {_short(got)} but the replay has none")
            continue
        seen = set(got) if _hashable(got) else None
        missing = [v for v in want if (v not in seen if seen is not None else v not in got)]
        allowed = set(want) if _hashable(want) else None
        unknown = [v for v in got if (v not in allowed if allowed is not None else v not in want)]
        if missing:
            problems.append(f"key {key!r}: skipped {_short(missing)} (got {_short(got)})")
        if unknown:
            problems.append(
                f"key {key!r}: values the replay never produces {_short(unknown)} "
                f"(state over-counted? expected up to {want[-1]!r})"
            )
        if got and got[-1] != want[-1]:
            problems.append(f"key {key!r}: last output {got[-1]!r}, replay ends at {want[-1]!r}")
    return problems


def check_state(expected_final: Mapping[Any, Any], state: Mapping[Any, Any]) -> list[str]:
    """The final state (from the changelog) must equal the replay's final value per key."""
    problems: list[str] = []
    for key in sorted(set(expected_final) | set(state), key=repr):
        want, got = expected_final.get(key), state.get(key)
        if want != got:
            problems.append(f"state of key {key!r}: {got!r}, replay says {want!r}")
    return problems


def _hashable(values: list[Any]) -> bool:
    try:
        set(values)
    except TypeError:
        return False
    return True


def _short(values: Iterable[Any], n: int = 8) -> str:
    items = list(values)
    text = ", ".join(repr(v) for v in items[:n])
    return f"[{text}{', ...' if len(items) > n else ''}] ({len(items)})"


# --------------------------------------------------------------------------------------
# reading Kafka
# --------------------------------------------------------------------------------------


async def read_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    committed: bool = True,
    key_serde: Serde[Any] | None = None,
    value_serde: Serde[Any] | None = None,
) -> list[tuple[int, int, Any, Any, list[tuple[str, bytes]]]]:
    """Every record of ``topic`` up to its current end, as (partition, offset, key, value,
    headers), in offset order per partition. Keys/values decoded when a serde is given."""
    settings = Settings(bootstrap_servers=bootstrap_servers)
    n = await partition_count(settings, topic)
    records = await read_all(
        settings, [TopicPartition(topic, p) for p in range(n)], committed=committed
    )
    rows = [
        (
            r.partition,
            r.offset,
            r.key if key_serde is None or r.key is None else key_serde.deserialize(r.key),
            r.value if value_serde is None or r.value is None else value_serde.deserialize(r.value),
            list(r.headers),
        )
        for r in records
    ]
    rows.sort(key=lambda row: (row[0], row[1]))
    return rows


async def read_final_state(
    job: Job,
    operator_id: str,
    bootstrap_servers: str,
    *,
    committed: bool = True,
    state_name: str | None = None,
) -> dict[Any, Any]:
    """An operator's state rebuilt from its changelog with the workers' restore code.

    Returns user key (decoded with the stage's key serde) -> value, for the state named
    ``state_name`` (default: the operator's only state). Read after the workers stopped.
    """
    stage, _ = job.find_operator(operator_id)
    settings = Settings(bootstrap_servers=bootstrap_servers)
    out: dict[Any, Any] = {}
    for _, store in await operator_states(job, operator_id, settings, committed=committed):
        for name, user_key, _map_key, value in store.dump():
            if state_name is not None and name != state_name:
                continue
            key = stage.source.key_serde.deserialize(user_key)
            if key in out:
                raise VerificationError(f"key {key!r} has state in two changelog partitions")
            out[key] = value
    return out


async def committed_changelog_offsets(
    job: Job, operator_id: str, bootstrap_servers: str
) -> dict[int, int]:
    """Per task partition: the changelog offset its last *committed* checkpoint covers for
    ``operator_id`` (``cl`` in the offset metadata; -1 when nothing is committed yet).
    Empty while the changelog topic does not exist."""
    from aiokafka.admin import AIOKafkaAdminClient

    from headrace.runtime.kafka.topics import topic_partitions

    stage, _ = job.find_operator(operator_id)
    settings = Settings(bootstrap_servers=bootstrap_servers)
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        topic = job.changelog_topic(operator_id)
        n = (await topic_partitions(admin, [topic])).get(topic, 0)
        tps = [TopicPartition(t, p) for t in stage.source.topics for p in range(n)]
        found = (
            await admin.list_consumer_group_offsets(job.group_id(stage), partitions=tps)
            if tps
            else {}
        )
    finally:
        await admin.close()
    covered = dict.fromkeys(range(n), -1)
    for tp, om in found.items():
        meta = CheckpointMetadata.decode(om.metadata) if om is not None else None
        if meta is not None:
            off = meta.changelog_offsets.get(operator_id, -1)
            covered[tp.partition] = max(covered[tp.partition], off)
    return covered


async def wait_changelog_committed(
    job: Job,
    operator_id: str,
    bootstrap_servers: str,
    *,
    min_offset: int,
    wait_s: float = 120.0,
    alive: Callable[[], bool] | None = None,
) -> dict[int, int]:
    """Wait until every task's committed checkpoint covers changelog offset ``min_offset``.

    A fault that must happen *during a restore* needs something to restore: a worker that
    takes over a task nobody ever committed (all its owners died first, which a kill storm
    makes likely) restores zero records and never reaches the phase. Call this before
    starting such a worker. Under exactly-once the offsets include transaction markers, so
    the number of data records is at least about half of ``min_offset``.

    Raises :class:`AssertionError` naming the partitions still behind after ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        covered = await committed_changelog_offsets(job, operator_id, bootstrap_servers)
        behind = {p: off for p, off in covered.items() if off < min_offset}
        if covered and not behind:
            return covered
        if time.monotonic() > deadline or (alive is not None and not alive()):
            if not covered:
                raise AssertionError(f"changelog of {operator_id!r} does not exist")
            raise AssertionError(
                f"changelog of {operator_id!r}: committed checkpoints of partitions "
                f"{sorted(behind)} cover offsets {behind}, not yet {min_offset} "
                f"after {wait_s:.0f}s"
            )
        await asyncio.sleep(0.5)


async def wait_complete_checkpoint(
    job: Job, bootstrap_servers: str, *, wait_s: float = 60.0
) -> tuple[CheckpointSummary, list[CheckpointSummary]]:
    """Wait until the checkpoint log holds a checkpoint acknowledged, aligned, by every task.

    Output that caught up does not mean the checkpoint covering it was acknowledged: under
    at-least-once outputs are visible as soon as they are sent, before the commit and its ack;
    a job whose whole input fits in one interval has one checkpoint with acks, and a reader
    can come between the first tasks' acks and the last one's. Returns the newest complete
    checkpoint and every summary read (newest first).

    Raises :class:`AssertionError` with the newest summaries after ``wait_s``.
    """
    settings = Settings(bootstrap_servers=bootstrap_servers)
    deadline = time.monotonic() + wait_s
    while True:
        summaries = await read_checkpoints(job, settings)
        complete = [s for s in summaries if s.complete and s.aligned]
        if complete:
            return complete[0], summaries
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no checkpoint of job {job.name!r} acknowledged and aligned by every task "
                f"after {wait_s:.0f}s; newest: "
                + "; ".join(
                    f"{s.checkpoint_id}: missing {sorted(s.expected - s.acked)}, "
                    f"aligned={s.aligned}"
                    for s in summaries[:5]
                )
            )
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------------------
# the verifier
# --------------------------------------------------------------------------------------


@dataclass
class Verifier:
    """Verify one job run: input topic -> replay -> compare with output topic and state.

    ``replay`` maps the input values (in partition/offset order) to the expected output per
    key. The serdes decode the output topic; ``input_serde`` decodes input values before they
    reach ``replay`` (raw bytes if None).
    """

    bootstrap_servers: str
    replay: Replay
    key_serde: Serde[Any] = STR
    value_serde: Serde[Any] = INT
    input_serde: Serde[Any] | None = STR
    #: the final state per key, from the replayed output sequence (default: its last value)
    final_state: Callable[[list[Any]], Any] = field(default=lambda seq: seq[-1])
    #: input values the job rejects (bad records under skip/dead_letter) are left out
    input_filter: Callable[[bytes | None], bool] | None = None

    async def expected(self, input_topic: str) -> Expected:
        rows = await read_topic(self.bootstrap_servers, input_topic, committed=True)
        values: list[Any] = []
        for _p, _o, _k, v, _h in rows:
            if self.input_filter is not None and not self.input_filter(v):
                continue
            values.append(
                v if self.input_serde is None or v is None else self.input_serde.deserialize(v)
            )
        return self.replay(values)

    async def observed(self, output_topic: str) -> Observed:
        rows = await read_topic(
            self.bootstrap_servers,
            output_topic,
            committed=True,
            key_serde=self.key_serde,
            value_serde=self.value_serde,
        )
        out: dict[Any, list[Any]] = defaultdict(list)
        for _p, _o, k, v, _h in rows:
            out[k].append(v)
        return dict(out)

    async def wait_caught_up(
        self,
        expected: Expected,
        output_topic: str,
        *,
        wait_s: float = 90.0,
        stable_s: float = 30.0,
        alive: Callable[[], bool] | None = None,
    ) -> Observed:
        """Poll the output until every key's last value is the replay's last value.

        Returns the last observation (possibly not caught up: the checks then say why).
        Stops early when ``alive`` says the workers are gone, or when the output has not
        changed for ``stable_s`` seconds although it differs (e.g. a count went past the end).
        """
        want = {k: seq[-1] for k, seq in expected.items() if seq}
        now = time.monotonic()
        deadline = now + wait_s
        previous: dict[Any, Any] | None = None
        changed = now
        while True:
            observed = await self.observed(output_topic)
            last = {k: seq[-1] for k, seq in observed.items() if seq}
            now = time.monotonic()
            if last != previous:
                previous, changed = last, now
            if (
                last == want
                or now > deadline
                or now - changed > stable_s
                or (alive is not None and not alive())
            ):
                return observed
            await asyncio.sleep(1.0)

    async def verify(
        self,
        *,
        input_topic: str,
        output_topic: str,
        guarantee: str,
        job: Job | None = None,
        operator_id: str | None = None,
        expected: Expected | None = None,
        observed: Observed | None = None,
    ) -> Report:
        """Run every check; pass ``job`` and ``operator_id`` to also check the final state."""
        if expected is None:
            expected = await self.expected(input_topic)
        if observed is None:
            observed = await self.observed(output_topic)
        exactly_once = guarantee == "exactly_once"
        report = Report(
            guarantee,
            keys=len(expected),
            expected_records=sum(len(s) for s in expected.values()),
            observed_records=sum(len(s) for s in observed.values()),
        )
        report.repeats = max(0, report.observed_records - report.expected_records)
        if exactly_once:
            report.problems += check_exactly_once(expected, observed)
        else:
            report.problems += check_at_least_once(expected, observed)
        if job is not None and operator_id is not None:
            state = await read_final_state(
                job, operator_id, self.bootstrap_servers, committed=exactly_once
            )
            final = {k: self.final_state(seq) for k, seq in expected.items() if seq}
            report.problems += check_state(final, state)
            report.state_checked = True
        return report


def wordcount_verifier(bootstrap_servers: str) -> Verifier:
    """The verifier for examples.wordcount-shaped jobs (STR lines in, (STR, INT) out)."""
    return Verifier(bootstrap_servers, wordcount_replay, key_serde=STR, value_serde=INT)
