"""Per-state migration functions applied while a savepoint is loaded (schema evolution).

A state whose serde or kind changed between the savepoint's job and the job it is loaded into
is refused by the identity rules, unless the user gives a function for it
(``--migrate OPERATOR.STATE=MODULE:FUNCTION``): each stored value is then decoded with the
savepoint's serde, passed to the function, and encoded with the state's serde in the new job.
A list state's function gets and returns the whole list; a map state's gets each map value.

The savepoint names its serdes; only the built-in ones can be found by name (a custom serde
cannot be rebuilt from a name, and is refused with that reason). TTL states are not migrated
(their stored values carry an expiry envelope the function should not have to know).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from headrace.operators.job import Job
from headrace.operators.serde import BYTES, FLOAT, INT, JSON, MSGPACK, STR, Serde
from headrace.operators.state import declared_state
from headrace.runtime.savepoint.fileformat import SavepointError
from headrace.runtime.state.encoding import decode_list, encode_list

__all__ = ["Migration", "plan_migrations"]

BUILT_IN: dict[str, Serde[Any]] = {s.name: s for s in (JSON, MSGPACK, STR, INT, FLOAT, BYTES)}


@dataclass(frozen=True, slots=True)
class Migration:
    """How one state's stored bytes become the new job's: decode, ``fn``, encode."""

    old: Serde[Any]
    new: Serde[Any]
    fn: Callable[[Any], Any]
    is_list: bool

    def __call__(self, raw: bytes) -> bytes:
        if self.is_list:
            return encode_list(self.fn(decode_list(raw, self.old.deserialize)), self.new.serialize)
        return self.new.serialize(self.fn(self.old.deserialize(raw)))


def plan_migrations(
    header: dict[str, Any], job: Job, functions: dict[str, Callable[[Any], Any]]
) -> dict[tuple[str, str], Migration]:
    """``functions``: ``"operator.state"`` (the new job's names) -> function. Checked against
    the savepoint and the job before anything is written."""
    recorded = header["job"]["operators"]
    steps = {step.operator_id: step for _, step in job.stateful_operators()}
    plans: dict[tuple[str, str], Migration] = {}
    for name, fn in functions.items():
        op, _, state = name.partition(".")
        step = steps.get(op)
        declared = declared_state(type(step.prototype)) if step is not None else {}
        desc = next((d for a, d in declared.items() if (d.name or a) == state), None)
        saved = recorded.get(op, {}).get("states", {}).get(state)
        if desc is None or saved is None:
            raise SavepointError(
                f"--migrate {name}: both the savepoint (after --map) and the job must have "
                f"state {state!r} of operator {op!r}"
            )
        if saved["ttl"] or desc.ttl is not None:
            raise SavepointError(f"--migrate {name}: states with a TTL are not migrated")
        old = BUILT_IN.get(saved["serde"])
        if old is None:
            raise SavepointError(
                f"--migrate {name}: the savepoint's serde {saved['serde']!r} is not built in, "
                "so its values cannot be decoded from its name"
            )
        kinds = {saved["kind"], str(desc.kind)}
        if len(kinds) > 1 and "list" in kinds:
            raise SavepointError(f"--migrate {name}: a list state stays a list state")
        plans[(op, state)] = Migration(old, desc.serde, fn, saved["kind"] == "list")
    return plans
