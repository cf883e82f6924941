"""Per-record CPU of turning a fetched record batch into records, without Kafka (a script, not
a test): aiokafka's ``FetchResult.getall`` (``ConsumerRecord``s) against headrace's batch
reader (``FetchedRecord``s, ``runtime/kafka/fetch.py``) over the same bytes, and the C decoding
alone as the floor of both.

    python bench/fetch_micro.py [--records 20000] [--runs 5]

Prints the best of ``--runs`` in ns per record for S1-like records (8-byte key, 40-byte value)
without headers and with one header (a repartition hop's channel).
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable
from typing import Any

from aiokafka.consumer.fetcher import FetchResult, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from headrace.runtime.kafka.fetch import _BatchReader

PER_BATCH = 1000
TP = TopicPartition("bench", 0)


def batches(records: int, headers: list[tuple[str, bytes]]) -> bytes:
    """``records`` records in batches of 1,000, offsets from 0, as a fetch response holds them."""
    out = bytearray()
    for b in range(records // PER_BATCH):
        builder = DefaultRecordBatchBuilder(
            magic=2,
            compression_type=0,
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=1 << 22,
        )
        for i in range(PER_BATCH):
            builder.append(
                i, timestamp=1_700_000_000_000, key=b"key%05d" % i, value=b"v" * 40, headers=headers
            )
        batch = bytearray(builder.build())
        struct.pack_into(">q", batch, 0, b * PER_BATCH)  # base offset
        out += batch
    return bytes(out)


class _Position:
    """The consumer's position of the one partition (what a fetch result checks and moves)."""

    paused = False
    position = 0

    def consumed_to(self, position: int) -> None:
        self.position = position


class _Assignment:
    active = True

    def __init__(self) -> None:
        self.state = _Position()

    def state_value(self, tp: TopicPartition) -> _Position:
        return self.state


def fetch_result(data: bytes, *, isolation_level: int = 0, aborted: Any = ()) -> FetchResult:
    """A fetch result of ``data`` as aiokafka's fetcher makes one (position 0)."""
    records = PartitionRecords(
        TP, MemoryRecords(data), list(aborted), 0, None, None, True, isolation_level
    )
    return FetchResult(TP, assignment=_Assignment(), partition_records=records, backoff=0)


def through_aiokafka(data: bytes) -> list[Any]:
    return fetch_result(data).getall()


def through_headrace(data: bytes) -> list[Any]:
    result = fetch_result(data)
    return _BatchReader(result, result._partition_records).getall()


def decoding_only(data: bytes) -> list[Any]:
    memory, out = MemoryRecords(data), []
    while memory.has_next():
        out.extend(memory.next_batch())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    cases: dict[str, Callable[[bytes], list[Any]]] = {
        "aiokafka ConsumerRecord": through_aiokafka,
        "headrace FetchedRecord": through_headrace,
        "C decoding alone": decoding_only,
    }
    for label, headers in (("no headers", []), ("one header", [("hr.ch", b"3")])):
        data = batches(a.records, headers)
        best: dict[str, float] = {}
        for _ in range(a.runs):
            for name, case in cases.items():  # alternating, so drift hits all alike
                t = time.process_time()
                n = len(case(data))
                ns = (time.process_time() - t) / n * 1e9
                best[name] = min(best.get(name, ns), ns)
        floor = best["C decoding alone"]
        print(f"{label}:")
        for name, ns in best.items():
            print(f"  {name:<26} {ns:7.0f} ns/record  ({ns / floor:.2f}x the decoding)")


if __name__ == "__main__":
    main()
