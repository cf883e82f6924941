"""Page statistics from two co-partitioned topics: a join-shaped job with a hop.

``views`` and ``clicks`` are both keyed by user and have the same partition count, so partition
``p`` of both goes to one task: the ``per-user`` operator sees every event of a user, whichever
topic it came from, and keeps per-user counts in a ``MapState``. Events are then re-keyed by
page (``key_by``) and ``per-page`` keeps the totals per page and kind.

    headrace run examples.pageviews:job

Topic names come from PAGEVIEWS_JOB / PAGEVIEWS_VIEWS / PAGEVIEWS_CLICKS / PAGEVIEWS_SINK so the
tests can run it on fresh topics.
"""

from __future__ import annotations

import os
from typing import Any

from headrace.operators.job import Job
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import JSON, STR
from headrace.operators.state import MapStateDescriptor, ValueStateDescriptor


class PerUser(Operator):
    """Counts each user's events per kind and forwards the event with the user's running total."""

    per_kind = MapStateDescriptor[str, int](key_type=str, type=int)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        event = record.value
        kind = record.topic.rsplit("-", 1)[0] if "-" in record.topic else record.topic
        n = (self.per_kind.get(kind) or 0) + 1
        self.per_kind.put(kind, n)
        ctx.emit({"page": event["page"], "kind": kind, "user": record.key, "user_total": n})


class PerPage(Operator):
    """Totals per page and kind."""

    totals = ValueStateDescriptor[dict[str, int]](serde=JSON, default=dict)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        totals = dict(self.totals.value())
        totals[record.value["kind"]] = totals.get(record.value["kind"], 0) + 1
        self.totals.update(totals)
        ctx.emit(totals)


def build(
    name: str = "pageviews",
    views: str = "views",
    clicks: str = "clicks",
    sink: str = "page-stats",
) -> Job:
    job = Job(name)
    (
        job.source(views, clicks, key_serde=STR, value_serde=JSON)
        .process(PerUser(), name="per-user")
        .key_by(lambda e: e["page"], key_serde=STR, value_serde=JSON)
        .process(PerPage(), name="per-page")
        .sink(sink, key_serde=STR, value_serde=JSON)
    )
    return job


job = build(
    os.environ.get("PAGEVIEWS_JOB", "pageviews"),
    os.environ.get("PAGEVIEWS_VIEWS", "views"),
    os.environ.get("PAGEVIEWS_CLICKS", "clicks"),
    os.environ.get("PAGEVIEWS_SINK", "page-stats"),
)
