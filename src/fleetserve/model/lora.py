"""LoRA adapter slots: which adapters sit in host memory, which in GPU slots, and which are loading.

Like vLLM (and S-LoRA), adapters live in a bounded host cache (`max_cpu_loras`) and at most `max_loras`
of them occupy GPU slots at once. Moving an adapter into a GPU slot takes its size over PCIe; a request
for it waits until that load completes. A slot is reused least-recently-used first, and only
when no running or waiting request asks for its adapter. Because every adapter a running request uses
holds a slot, a batch never mixes more than `max_loras` adapters.

Pure bookkeeping: the caller passes `now` and asks for the next load completion.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from fleetserve.errors import InputError


class LoraManager:
    def __init__(
        self,
        max_loras: int,
        max_cpu_loras: int,
        load_time: Callable[[int], float],
        default_size_bytes: int,
    ) -> None:
        self.max_loras = max_loras
        # vLLM requires the host cache to hold at least the GPU-resident adapters.
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self._load_time = load_time
        self.default_size_bytes = default_size_bytes
        self._host: OrderedDict[str, int] = OrderedDict()  # name -> size in bytes, LRU first
        self._slots: OrderedDict[str, float] = OrderedDict()  # name -> time the GPU load completes
        self._in_use: dict[str, int] = {}  # name -> running requests using it
        self._wanted: dict[str, int] = {}  # name -> waiting requests asking for it
        self._loading: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.max_loras > 0

    @property
    def names(self) -> list[str]:
        """Adapters resident on this engine (host cache, which includes the GPU-resident ones)."""
        return list(self._host)

    @property
    def gpu_names(self) -> list[str]:
        return list(self._slots)

    def is_loading(self, name: str) -> bool:
        return name in self._loading

    def register(self, name: str, size_bytes: int | None = None) -> None:
        """Put an adapter in the host cache, evicting the least recently used idle one if it is full."""
        if name in self._host:
            self._host.move_to_end(name)
            if size_bytes is not None:
                self._host[name] = size_bytes
            return
        self._host[name] = self.default_size_bytes if size_bytes is None else size_bytes
        while len(self._host) > self.max_cpu_loras:
            victim = next((other for other in self._host if other not in self._slots), None)
            if victim is None:
                break
            del self._host[victim]

    def unregister(self, name: str) -> None:
        """Drop an adapter from host and GPU. Refused while a running request uses it."""
        if self._in_use.get(name):
            raise InputError(f"adapter {name!r} is in use by running requests")
        self._host.pop(name, None)
        self._slots.pop(name, None)
        self._loading.discard(name)

    def ready(self, name: str, now: float) -> bool:
        """Whether a request for `name` can run now. If not and a GPU slot can be had, start loading it
        (registering the adapter on the fly if the host does not hold it, as vLLM's resolvers do)."""
        ready_at = self._slots.get(name)
        if ready_at is not None:
            self._slots.move_to_end(name)
            return ready_at <= now
        if name not in self._host:
            self.register(name)
        if len(self._slots) >= self.max_loras and not self._evict_idle_slot():
            return False
        self._host.move_to_end(name)
        self._slots[name] = now + self._load_time(self._host[name])
        self._loading.add(name)
        return False

    def complete_loads(self, now: float) -> None:
        for name in [name for name in self._loading if self._slots[name] <= now]:
            self._loading.discard(name)

    def next_load_completion(self) -> float | None:
        if not self._loading:
            return None
        return min(self._slots[name] for name in self._loading)

    def want(self, name: str) -> None:
        """A request for `name` joined the waiting queue; its slot is kept over idle ones."""
        self._wanted[name] = self._wanted.get(name, 0) + 1

    def unwant(self, name: str) -> None:
        count = self._wanted[name] - 1
        if count:
            self._wanted[name] = count
        else:
            del self._wanted[name]

    @property
    def running_names(self) -> list[str]:
        return list(self._in_use)

    @property
    def waiting_names(self) -> list[str]:
        return list(self._wanted)

    def acquire(self, name: str) -> None:
        """A running request starts using an adapter: its slot is pinned."""
        self._in_use[name] = self._in_use.get(name, 0) + 1

    def release(self, name: str) -> None:
        count = self._in_use[name] - 1
        if count:
            self._in_use[name] = count
        else:
            del self._in_use[name]

    def _evict_idle_slot(self) -> bool:
        for name in self._slots:
            if name not in self._in_use and name not in self._wanted and name not in self._loading:
                del self._slots[name]
                return True
        return False
