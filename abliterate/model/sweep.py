"""Batch-major algorithms on a layer-streamed model, each layer read once per sweep.

Generation, teacher forcing and the search's trials loop over batches, and each batch calls the
model's forward many times (one per generated token). On a streamed model
(:mod:`abliterate.model.streaming`) running them batch after batch would read every layer once
per batch and per token. Instead :meth:`LayerSweep.run` runs each batch's work in its own thread,
one thread at a time (a baton), and a gate in front of every decoder layer parks the thread that
reaches it. When every thread is parked or done, the sweep picks the layer to serve: the one in
memory while threads wait for it, else the next one up, else the lowest (a new sweep from the
first layer). That layer is read once and every thread parked there runs it in turn, in batch
order. So one token of generation for the whole prompt set reads the weights once
(cost: tokens x the model's bytes), and the answers are the same as batch after batch: each
batch keeps its own hidden states and KV cache, and only one thread computes at a time.

The price is that every batch's state (its KV cache while generating) is held at once. When the
caller says what each batch will hold (``costs``) and the sweep has a ``budget``, the batches run in
consecutive waves that fit it: each wave reads the weights once per token, so ``W`` waves cost
``W`` times the reads of one and hold a ``W``-th of the state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

START = -1  # the gate a worker waits at before it has run anything
BUFFER = 16  # items a streamed each_batch_items holds before its consumer takes them


class _Aborted(Exception):
    """Raised in parked workers when another worker failed: they stop without running further."""


class LayerSweep:
    """The scheduler of one streamed model (installed by :func:`install`)."""

    def __init__(self, streamed, on_read: Callable[[int, int], None] | None = None, budget: int | None = None):
        self.streamed = streamed
        self.on_read = on_read  # (layer, bytes) each time a layer is read
        self.budget = budget  # bytes the batches of one wave may hold at once (None: no limit)
        self.waves = 0  # waves run since install (tests and progress)
        self.cond = threading.Condition()
        self.local = threading.local()
        self.parked: dict[int, list[int]] = {}  # gate (layer or START) -> worker ids waiting there
        self.baton: int | None = None  # the worker allowed to run
        self.loaded: int | None = None
        self.aborted = False
        self.reads = 0  # layers read since install (tests and progress)

    def gate(self, layer: int) -> None:
        """Park the calling worker in front of ``layer`` until the sweep serves it (no-op outside a sweep)."""
        me = getattr(self.local, "worker", None)
        if me is None:
            return
        self._park(me, layer)

    def _park(self, me: int, layer: int) -> None:
        with self.cond:
            self.parked.setdefault(layer, []).append(me)
            self.baton = None
            self.cond.notify_all()
            while self.baton != me:
                if self.aborted:
                    raise _Aborted
                self.cond.wait()

    def run(self, works: list[Callable[[], None]], costs: list[int] | None = None) -> None:
        """Run every ``work()`` (one batch each) to the end, layer-major; re-raises the first failure.

        ``costs[k]``: bytes work ``k`` holds while it runs; with a :attr:`budget`, consecutive works
        run together while their costs fit it (one work at least per wave)."""
        for wave in waves(costs if costs is not None else [0] * len(works), self.budget):
            self.waves += 1
            self._run_wave([works[k] for k in wave])

    def _run_wave(self, works: list[Callable[[], None]]) -> None:
        if not works:
            return
        errors: list[BaseException] = []
        done: set[int] = set()

        def worker(k: int, work: Callable[[], None]) -> None:
            self.local.worker = k
            try:
                self._park(k, START)
                work()
            except _Aborted:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                errors.append(exc)
            finally:
                with self.cond:
                    done.add(k)
                    self.baton = None
                    self.cond.notify_all()

        threads = [threading.Thread(target=worker, args=(k, w), daemon=True) for k, w in enumerate(works)]
        with self.cond:
            self.parked, self.baton, self.aborted = {}, -2, False  # -2: nobody runs until all are parked
        for t in threads:
            t.start()
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: sum(len(v) for v in self.parked.values()) + len(done) == len(works)
                                       and (self.baton is None or self.baton == -2))
                    if errors or len(done) == len(works):
                        break
                    gate = self._next_gate()
                if gate != START and gate != self.loaded:
                    self._load(gate)
                with self.cond:
                    waiting = self.parked[gate]
                    waiting.sort()
                    self.baton = waiting.pop(0)
                    if not waiting:
                        del self.parked[gate]
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.aborted = True
                self.cond.notify_all()
            for t in threads:
                t.join()
            if self.loaded is not None:
                self.streamed.release(self.loaded)
                self.loaded = None
        if errors:
            raise errors[0]

    def _next_gate(self) -> int:
        gates = sorted(self.parked)
        if START in self.parked:
            return START
        if self.loaded in self.parked:
            return self.loaded
        above = [g for g in gates if self.loaded is not None and g > self.loaded]
        return above[0] if above else gates[0]

    def _load(self, layer: int) -> None:
        if self.loaded is not None:
            self.streamed.release(self.loaded)
            self.loaded = None
        self.streamed.materialize(layer)
        self.loaded = layer
        self.reads += 1
        if self.on_read is not None:
            self.on_read(layer, self.streamed.layer_bytes[layer])


def waves(costs: list[int], budget: int | None) -> list[list[int]]:
    """Consecutive groups of indices whose costs sum to at most ``budget`` (each holds one at least)."""
    groups: list[list[int]] = []
    held = 0
    for k, cost in enumerate(costs):
        if groups and (budget is None or held + cost <= budget):
            groups[-1].append(k)
            held += cost
        else:
            groups.append([k])
            held = cost
    return groups


def install(streamed, budget: int | None = None) -> LayerSweep:
    """Put a gate in front of every decoder layer of ``streamed`` and attach the sweep to its model;
    ``budget``: bytes the batches of one wave may hold (see :meth:`LayerSweep.run`)."""
    sweep = LayerSweep(streamed, budget=budget)
    for i, layer in enumerate(streamed.layers):
        layer.register_forward_pre_hook(lambda _module, _args, i=i: sweep.gate(i))
    streamed.model.abliterate_sweep = sweep
    return sweep


def each_batch(model, works: list[Callable[[], None]], costs: list[int] | None = None) -> None:
    """Run ``works`` one after another on a loaded model, or layer-major on a streamed one (in waves
    that fit its budget when ``costs``, the bytes each work holds, are given)."""
    sweep = getattr(model, "abliterate_sweep", None)
    if sweep is None:
        for work in works:
            work()
    else:
        sweep.run(works, costs)


def each_batch_items(model, works: list[Callable[[], Iterator]]) -> Iterator:
    """Every item the ``works`` yield (one iterator per batch): batch after batch on a loaded model;
    on a streamed one, in the order the sweep produces them, at most :data:`BUFFER` held at once."""
    sweep = getattr(model, "abliterate_sweep", None)
    if sweep is None:
        for work in works:
            yield from work()
        return
    import queue

    items: queue.Queue = queue.Queue(maxsize=BUFFER)
    stop = threading.Event()

    def put(entry: tuple) -> None:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Aborted

    def drain(work: Callable[[], Iterator]) -> None:
        for item in work():
            put(("item", item))

    def runner() -> None:
        try:
            sweep.run([lambda w=w: drain(w) for w in works])
            put(("done", None))
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            try:
                put(("error", exc))
            except _Aborted:
                pass

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        thread.join()
