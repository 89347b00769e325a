"""Who runs an external op (`moec::external_moe`, `moec::external_attention`): a per-thread slot.

The compiled graph calls such an op in whichever thread runs it, and the op hands the work to the
executor of the engine stepping there. Per thread, with a process-wide fallback for threads that
set none, so that engines stepping at once in different threads each reach their own (an engine
sets its executors before each step; its micro-batch workers take their caller's).
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

Executor = TypeVar("Executor")


class ExecutorSlot(Generic[Executor]):
    def __init__(self) -> None:
        self._process: Executor | None = None
        self._thread = threading.local()

    def set(self, executor: Executor | None, this_thread_only: bool = False) -> None:
        """For the calling thread and, unless `this_thread_only`, for every thread that set none."""
        self._thread.executor = executor
        if not this_thread_only:
            self._process = executor

    def get(self) -> Executor | None:
        return getattr(self._thread, "executor", None) or self._process
