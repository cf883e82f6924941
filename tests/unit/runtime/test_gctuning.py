"""The worker's collector threshold: applied while workers run, restored after the last one."""

from __future__ import annotations

import gc

import pytest

from headrace.runtime.config import Settings, SettingsError
from headrace.runtime.gctuning import young_threshold


def test_threshold_applies_while_any_worker_runs_and_is_restored_after_the_last() -> None:
    before = gc.get_threshold()
    with young_threshold(20_000):
        assert gc.get_threshold() == (20_000, *before[1:])
        with young_threshold(5_000):  # a second worker in the process: the first one's stays
            assert gc.get_threshold()[0] == 20_000
        assert gc.get_threshold()[0] == 20_000  # the first worker still runs
    assert gc.get_threshold() == before


def test_restored_when_the_worker_fails() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), young_threshold(30_000):
        raise RuntimeError("worker failed")
    assert gc.get_threshold() == before


def test_zero_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    with young_threshold(0):
        assert gc.get_threshold() == before


def test_setting_default_env_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().gc_young_threshold == 20_000
    monkeypatch.setenv("HEADRACE_GC_YOUNG_THRESHOLD", "0")
    assert Settings.from_env().gc_young_threshold == 0
    with pytest.raises(SettingsError, match="--gc-young-threshold / HEADRACE_GC_YOUNG_THRESHOLD"):
        Settings(gc_young_threshold=-1)
