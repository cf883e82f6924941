"""headrace operators inside a faust-streaming app: ``headrace_agent(app, topic, MyOperator)``.

A team on faust keeps its app, its worker command and its other agents, and gets headrace's
declared state (value, list, map, aggregating, reducing and keyed state, write-back cache,
memory or RocksDB backend), checkpoints and restore for one agent::

    app = faust.App("shop", broker="kafka://localhost:9092")
    counts = headrace_agent(app, "orders", CountPerCustomer, sink="order-counts",
                            sink_key_serde=STR, sink_value_serde=INT)

The bridge registers a faust agent (concurrency 1) over ``topic``. The agent is one headrace
**stage** (:mod:`.plan`): every source partition is a task assembled, restored, claimed, opened,
fed and checkpointed by the task host (:class:`~headrace.runtime.host.StageHost`), exactly as in
a headrace worker; ``current_key`` is the raw record key. ``ctx.emit(value, key=...)`` writes
to ``sink`` (a faust topic or a topic name), in batches with the task's next checkpoint (so an
output waits up to ``checkpoint_interval``: faust hands over one event at a time, and a send per
event would cost a produce request each). :mod:`.bridge` is the faust glue: how faust hands
records and partitions to the host.

Guarantee: exact state, at-least-once output
============================================

This is headrace's ``at_least_once`` (ARCHITECTURE.md sections 5 and 6), with faust's consumer
as the source of records:

1. **Checkpoints** are headrace's: clock barriers every ``checkpoint_interval`` seconds (and a
   final one on revocation and at shutdown), committed by the
   :class:`~headrace.runtime.checkpoint.commit.Committer`: outputs and changelog writes (to
   ``<app id>.<name>.changelog``, stamped with the writer epoch) are acknowledged first, then
   the input offsets are committed with the checkpoint metadata into the bridge's own group
   ``<app id>.<name>`` (faust's group keeps faust's commits, which carry no metadata), and an
   ack goes to ``<app id>.checkpoints``.
2. **faust's offsets stay behind the checkpoints.** The agent iterates ``stream.noack()`` and
   acks an event once a committed checkpoint covers it, so faust's commit stays at or behind
   the bridge's.
3. **Restore** (faust's ``on_rebalance_complete`` signal, awaited by faust before it seeks the
   stream partitions and resumes them): the host reads the bridge group's committed offsets and
   metadata and restores the changelog up to the committed checkpoint (later records are not
   state and their keys are rewritten at the next checkpoint); then the task claims its writer
   epoch and its operators open at the committed cut.
4. **Resume at the cut.** Still inside the signal, the bridge commits the checkpoint's offsets
   as faust's, so faust's seek-to-committed resumes exactly at the first record the state does
   not contain. Records below it that arrive anyway are skipped by the task.

Across a hop (one ``headrace_agent`` writing a topic that another one of the same app reads)
the hop is headrace's repartition hop: records carry ``hr.ch`` and ``hr.seq``, checkpoints
write barriers into the topic, and the reading bridge aligns them and drops upstream replays by
sequence number, so its state is exact too. The hop topic is written with headrace's
partitioner (crc32 of the key bytes) and carries headrace's barrier records (empty value,
``hr.barrier`` header), so other readers of it must skip those. As in headrace, this needs a
deterministic upstream operator, and only the first hop after a source bridge is deduplicated.

Upgrading from the first bridge, which kept its checkpoints as markers in the changelog and
its offsets in faust's group: a task whose bridge group has no committed offset takes over the
last marker of a source-fed bridge, and a hop-fed bridge with such state refuses to start
(:mod:`.legacy` says why).

What does *not* hold:

* Output records may repeat after a crash (at-least-once), as in headrace's ``at_least_once``.
* The offset commit is not fenced: a worker that is expelled from faust's group *without* a
  revocation (stalled past ``broker_session_timeout``) may still commit one checkpoint for a
  partition that another worker already restored (its changelog writes carry an older writer
  epoch and are skipped). headrace's ``exactly_once`` mode fences with transactions.
* faust's ``processing_guarantee="exactly_once"`` is not supported by this bridge (it refuses
  to start), and an agent with ``concurrency`` > 1 could reorder a partition's records, so the
  bridge always registers its agent with concurrency 1. A sink must be a Kafka topic.
* The bridge uses faust-streaming internals that are not public API (``Consumer._commit`` for
  the rewind, ``on_rebalance_complete`` ordering, ``App.rebalancing``); it is tested with
  faust-streaming 0.11-0.15.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headrace.operators.operator import Operator
from headrace.operators.serde import BYTES, Serde
from headrace.runtime.integrations.faust.bridge import BridgeStats, FaustBridge
from headrace.runtime.integrations.faust.plan import BridgeSpec, faust_serde, register
from headrace.runtime.state.backend import BACKEND_KINDS

__all__ = ["BridgeStats", "FaustBridge", "headrace_agent"]


def headrace_agent(
    app: Any,
    topic: Any,
    operator: Operator | type[Operator],
    *,
    name: str | None = None,
    sink: Any = None,
    key_serde: Serde[Any] | None = BYTES,
    value_serde: Serde[Any] | None = BYTES,
    sink_key_serde: Serde[Any] | None = None,
    sink_value_serde: Serde[Any] | None = None,
    changelog_topic: str | None = None,
    checkpoint_interval: float = 1.0,
    state_backend: str = "memory",
    state_dir: Path | str | None = None,
    replication_factor: int = 1,
) -> FaustBridge:
    """Run ``operator`` (an instance, copied per partition, or a class) as a faust agent.

    ``topic`` is a faust topic or a topic name (a name becomes a topic with raw serializers).
    The bridge deserializes the raw ``event.message.key/value`` with ``key_serde``/``value_serde``
    (``None`` passes bytes through), so declare a given topic with ``key_serializer="raw"`` and
    ``value_serializer="raw"`` to spare faust a decode the bridge does not use.
    ``sink`` is a faust topic or a topic name (outputs go through headrace's producer with
    its checkpoints); they are serialized with ``sink_key_serde``/``sink_value_serde`` when
    given, else by the sink's own codecs. A sink that another ``headrace_agent`` of the app
    reads is a hop (see the module docstring).
    ``name`` (default: the operator's id or lower-case class name) is the state namespace and
    must stay stable; the changelog defaults to ``<app id>.<name>.changelog``. ``state_backend``
    is ``memory`` or ``rocksdb`` (``state_dir`` required, default ``<app datadir>/headrace``).
    See the module docstring for the guarantee.
    """
    if isinstance(operator, type):
        operator = operator()
    if not isinstance(operator, Operator):
        raise TypeError(f"headrace_agent needs an Operator, got {type(operator).__name__}")
    if state_backend not in BACKEND_KINDS:
        raise ValueError(f"state_backend must be one of {BACKEND_KINDS}, got {state_backend!r}")
    if not checkpoint_interval > 0:
        raise ValueError("checkpoint_interval must be a positive number of seconds")
    guarantee = str(getattr(app.conf, "processing_guarantee", "at_least_once"))
    if "exactly" in guarantee.lower():
        raise ValueError(
            "headrace_agent supports faust's at_least_once processing guarantee only "
            f"(app has {guarantee!r})"
        )
    op_name = name or operator.operator_id or type(operator).__name__.lower()
    if isinstance(topic, str):
        topic = app.topic(
            topic, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
        )
    if isinstance(sink, str):
        sink = app.topic(
            sink, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
        )
    sink_name: str | None = None
    if sink is not None:
        try:
            sink_name = sink.get_topic_name()
        except (AttributeError, NotImplementedError):
            raise TypeError(
                "headrace_agent writes its outputs to Kafka: sink must be a faust topic or a "
                f"topic name, got {type(sink).__name__}"
            ) from None
    directory: Path | None = None
    if state_backend == "rocksdb":
        directory = (
            Path(state_dir) if state_dir is not None else Path(app.conf.datadir) / "headrace"
        )
    spec = BridgeSpec(
        name=op_name,
        operator=operator,
        source=topic.get_topic_name(),
        sink=sink_name,
        key_serde=key_serde or BYTES,
        value_serde=value_serde or BYTES,
        sink_key_serde=sink_key_serde or (faust_serde(app, sink, "key") if sink else BYTES),
        sink_value_serde=sink_value_serde or (faust_serde(app, sink, "value") if sink else BYTES),
        changelog_topic=changelog_topic or f"{app.conf.id}.{op_name}.changelog",
    )
    register(app, spec)
    bridge = FaustBridge(
        app,
        spec,
        checkpoint_interval=checkpoint_interval,
        state_backend=state_backend,
        state_dir=directory,
        replication_factor=replication_factor,
    )

    async def run(stream: Any) -> None:
        await bridge._run(stream)

    run.__name__ = run.__qualname__ = f"headrace_{op_name.replace('-', '_').replace('.', '_')}"
    bridge.agent = app.agent(topic, name=f"headrace.{op_name}", concurrency=1)(run)
    app.on_rebalance_complete.connect(bridge._on_rebalance_complete)
    app.on_partitions_revoked.connect(bridge._on_partitions_revoked)
    app.on_before_shutdown.connect(bridge._on_shutdown)
    app.task(bridge.checkpoint_loop)
    return bridge
