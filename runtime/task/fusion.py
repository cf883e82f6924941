"""Fast paths of the per-record loop that change no behaviour.

* the built-in serdes' functions are replaced by narrower C-level variants that fall back to
  the serde's own function whenever they raise
  (:func:`headrace.runtime.state.encoding.fast_serde_function`, also used by the handles'
  serialisation at checkpoints);
* the built-in ``count``/``sum``/``reduce``/``aggregate`` operators run as steps that read and
  write their handle's cache directly (:func:`builtin_step`, through the handle's
  :meth:`~headrace.runtime.state.handles.base.BoundState.cache_port`): no ``Record``, context
  or handle calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from headrace.operators.builtins import builtin_kind
from headrace.operators.operator import Operator
from headrace.operators.serde import BYTES, FLOAT, INT, STR
from headrace.runtime.state.handles import ABSENT, MISS, AggregatingHandle, ValueHandle
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task.records import Step

#: Deserializers that never return None (a None key is written as no key by a sink).
_NEVER_NONE = frozenset({STR.deserialize, BYTES.deserialize, INT.deserialize, FLOAT.deserialize})


def never_none(fn: Callable[[Any], Any]) -> bool:
    try:
        return fn in _NEVER_NONE
    except TypeError:  # an unhashable callable object
        return False


def builtin_handle(op: Operator, store: OperatorStateStore) -> tuple[str, Any] | None:
    """``("count" | "fold" | "aggregate", handle)`` for a built-in ``count``, ``sum``/``reduce``
    or ``aggregate`` operator whose own ``process`` runs over a handle without TTL bound to
    ``store``; None for anything else (a user operator, a subclass overriding ``process``, TTL
    state), which then runs as written."""
    found = builtin_kind(op)
    if found is None:
        return None
    kind, attribute = found
    handle = vars(op).get(attribute)
    if kind == "aggregate":
        if type(handle) is not AggregatingHandle or handle.cache_port().ttl is not None:
            return None
    elif type(handle) is not ValueHandle:  # (TTL value state has its own handle class)
        return None
    if handle.cache_port().store is not store:
        return None
    return kind, handle


def builtin_step(op: Operator, store: OperatorStateStore, nxt: Step) -> Step | None:
    """The compiled step of a built-in ``count``/``sum``/``reduce``/``aggregate`` (see
    :func:`builtin_handle`), or None.

    It does what the operator's ``process`` does with its handle (``value()`` + ``update()``,
    or ``add()`` + ``get()``) on the handle's cache dict and dirty set directly (see
    :data:`headrace.runtime.state.handles.MISS`), without a ``Record``, a context or handle method
    calls, and emits with the record's key as the operator does.
    """
    found = builtin_handle(op, store)
    if found is None:
        return None
    kind, handle = found
    port = handle.cache_port()
    cache = port.cache
    get = cache.get
    dirty_add = port.dirty_add
    load = port.load

    if kind == "count":
        default = port.default

        def count_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            sk = store.current_key
            n = get(sk, MISS)
            if n is MISS:
                n = load(sk)
            if n is ABSENT:
                n = default()
            n = n + 1
            cache[sk] = ABSENT if n is None else n
            dirty_add(sk)
            nxt(r, kb, k, n)

        return count_step

    if kind == "fold":
        default = port.default
        fn = op.fn  # type: ignore[attr-defined]
        first_is_value = op.initial is None  # type: ignore[attr-defined]

        def fold_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            sk = store.current_key
            cur = get(sk, MISS)
            if cur is MISS:
                cur = load(sk)
            if cur is ABSENT:
                cur = default()
            new = v if cur is None and first_is_value else fn(cur, v)
            cache[sk] = ABSENT if new is None else new
            dirty_add(sk)
            nxt(r, kb, k, new)

        return fold_step

    function = handle.function
    create, add, result = function.create_accumulator, function.add, function.get_result

    def aggregate_step(r: Any, kb: Any, k: Any, v: Any) -> None:
        sk = store.current_key
        acc = get(sk, MISS)
        if acc is MISS:
            acc = load(sk)
        if acc is ABSENT:
            acc = create()
        acc = add(v, acc)
        cache[sk] = acc
        dirty_add(sk)
        nxt(r, kb, k, result(acc))

    return aggregate_step
