"""Concurrency with per-contact ordering: one FIFO per lane, one item of a lane at a time.

A lane is :attr:`~proca_sync.sync.records.SyncRecord.lane` (a contact, a campaign, …).
Workers :meth:`Lanes.take` the heads of up to *n* distinct lanes that are not busy,
oldest head first; the lanes stay busy until the worker calls :meth:`Lanes.finish` (the
head is done and leaves) or :meth:`Lanes.release` (the head stays, to be tried again).
So two items of one lane are never handled concurrently, nor out of the order in which
they were pushed, whatever the number of workers. Pure and synchronous: the runner wakes
its workers itself.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Lanes"]

T = TypeVar("T")


@dataclass(slots=True)
class _Lane(Generic[T]):
    items: deque[tuple[int, T]] = field(default_factory=deque)
    busy: bool = False


class Lanes(Generic[T]):
    """Per-lane FIFOs of items, handed out one lane head at a time."""

    def __init__(self) -> None:
        self._lanes: dict[str, _Lane[T]] = {}
        # (sequence of the lane's head, lane): lanes ready to be taken, oldest head first.
        # Stale entries (lane busy, emptied or with another head) are skipped lazily.
        self._ready: list[tuple[int, str]] = []
        self._seq = 0
        self._size = 0
        self._busy = 0

    def __len__(self) -> int:
        """Items held, busy heads included."""
        return self._size

    @property
    def busy(self) -> int:
        """Lanes whose head is being handled."""
        return self._busy

    @property
    def ready(self) -> bool:
        """Whether :meth:`take` would return something."""
        self._prune()
        return bool(self._ready)

    def push(self, lane: str, item: T) -> None:
        """Append ``item`` to the tail of ``lane``."""
        self._seq += 1
        entry = self._lanes.get(lane)
        if entry is None:
            entry = self._lanes[lane] = _Lane()
        entry.items.append((self._seq, item))
        self._size += 1
        if len(entry.items) == 1 and not entry.busy:
            heapq.heappush(self._ready, (self._seq, lane))

    def take(self, limit: int) -> list[tuple[str, T]]:
        """The heads of up to ``limit`` ready lanes (oldest first); those lanes become busy."""
        taken: list[tuple[str, T]] = []
        while self._ready and len(taken) < limit:
            seq, lane = heapq.heappop(self._ready)
            entry = self._lanes.get(lane)
            if entry is None or entry.busy or not entry.items or entry.items[0][0] != seq:
                continue
            entry.busy = True
            self._busy += 1
            taken.append((lane, entry.items[0][1]))
        return taken

    def finish(self, lane: str) -> T:
        """The busy head of ``lane`` is done: remove it; the lane is free again."""
        entry = self._busy_lane(lane)
        _, item = entry.items.popleft()
        self._size -= 1
        self._free(lane, entry)
        return item

    def release(self, lane: str) -> None:
        """The busy head of ``lane`` stays at the head, to be taken again later."""
        self._free(lane, self._busy_lane(lane))

    def discard(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove every item matching ``predicate`` except busy heads; in push order."""
        removed: list[tuple[int, T]] = []
        for lane, entry in list(self._lanes.items()):
            keep: deque[tuple[int, T]] = deque()
            for position, (seq, item) in enumerate(entry.items):
                if (position == 0 and entry.busy) or not predicate(item):
                    keep.append((seq, item))
                else:
                    removed.append((seq, item))
            if len(keep) == len(entry.items):
                continue
            self._size -= len(entry.items) - len(keep)
            entry.items = keep
            if not keep:
                del self._lanes[lane]
            elif not entry.busy:
                heapq.heappush(self._ready, (keep[0][0], lane))
        removed.sort(key=lambda pair: pair[0])
        return [item for _, item in removed]

    def drain(self) -> list[T]:
        """Remove every item that is not a busy head (for shutdown); in push order."""
        return self.discard(lambda _item: True)

    def __iter__(self) -> Iterator[T]:
        for entry in self._lanes.values():
            for _, item in entry.items:
                yield item

    def _busy_lane(self, lane: str) -> _Lane[T]:
        entry = self._lanes.get(lane)
        if entry is None or not entry.busy:
            raise KeyError(f"lane is not busy: {lane!r}")
        return entry

    def _free(self, lane: str, entry: _Lane[T]) -> None:
        entry.busy = False
        self._busy -= 1
        if entry.items:
            heapq.heappush(self._ready, (entry.items[0][0], lane))
        else:
            del self._lanes[lane]

    def _prune(self) -> None:
        while self._ready:
            seq, lane = self._ready[0]
            entry = self._lanes.get(lane)
            if entry is not None and not entry.busy and entry.items and entry.items[0][0] == seq:
                return
            heapq.heappop(self._ready)
