"""The master's view of its workers: generations, and one state per worker.

A generation is one configuration, the listening sockets its workers inherit
and a number of worker slots.  The master has exactly one serving generation
(its slots are kept full), at most one starting generation (a reload whose
workers boot beside the serving ones, which keep accepting) and any number of
retiring ones (replaced or abandoned: their workers finish their connections).

The transitions below are the only ones `Worker.move` and `Generation.move`
allow; every decision of the master reads these states, so a worker is
supervised exactly when it occupies a slot (BOOTING or SERVING) and a socket
stays open in the master exactly while a starting or serving generation
holds it.

Worker::

    BOOTING --"ready"--> SERVING --QUIT--> RETIRING --exit--> GONE
       |  \\________________|___QUIT___/       |
       |                    |                  |
       +---- ABRT/KILL -----+------------------+--> KILLED --exit--> GONE
       +---------------------- exit ------------------------------> GONE

Generation::

    STARTING --every slot SERVING--> SERVING --replaced--> RETIRING
       \\------------- abandoned (boot failures, newer HUP) ---/
"""

from __future__ import annotations

import enum
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .listeners import Groups


class WorkerState(enum.Enum):
    BOOTING = "booting"  # forked; accepts nothing yet
    SERVING = "serving"  # said "ready": accepts on its generation's sockets
    RETIRING = "retiring"  # sent QUIT: accepts what is queued, then finishes its connections
    KILLED = "killed"  # sent ABRT or KILL: expected to die
    GONE = "gone"  # reaped


WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.BOOTING: frozenset({WorkerState.SERVING, WorkerState.RETIRING, WorkerState.KILLED, WorkerState.GONE}),
    WorkerState.SERVING: frozenset({WorkerState.RETIRING, WorkerState.KILLED, WorkerState.GONE}),
    WorkerState.RETIRING: frozenset({WorkerState.KILLED, WorkerState.GONE}),
    WorkerState.KILLED: frozenset({WorkerState.GONE}),
    WorkerState.GONE: frozenset(),
}


class GenerationState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RETIRING = "retiring"


GENERATION_TRANSITIONS: dict[GenerationState, frozenset[GenerationState]] = {
    GenerationState.STARTING: frozenset({GenerationState.SERVING, GenerationState.RETIRING}),
    GenerationState.SERVING: frozenset({GenerationState.RETIRING}),
    GenerationState.RETIRING: frozenset(),
}


class TransitionError(RuntimeError):
    """A move the tables above do not allow: a bug in the master."""


@dataclass(eq=False)
class Worker:
    pid: int
    slot: int
    generation: Generation
    ctrl: socket.socket
    last_beat: float
    state: WorkerState = WorkerState.BOOTING
    since: float = field(default_factory=time.monotonic)  # when it entered its state
    active: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    members: dict = field(default_factory=dict)  # its view of the upstream members by (pool, member), for status

    def move(self, to: WorkerState) -> None:
        if to not in WORKER_TRANSITIONS[self.state]:
            raise TransitionError(f"worker {self.pid}: {self.state.value} -> {to.value}")
        self.state = to
        self.since = time.monotonic()

    @property
    def occupies_slot(self) -> bool:
        """Counts for its slot: supervision keeps one of these per slot."""
        return self.state in (WorkerState.BOOTING, WorkerState.SERVING)


@dataclass(eq=False)
class Generation:
    number: int
    cfg: Any
    sockets: Groups  # what its workers inherit: slot k the k-th of each address's (round-robin)
    nworkers: int
    state: GenerationState = GenerationState.STARTING
    workers: dict[int, Worker] = field(default_factory=dict)
    boot_failures: int = 0  # in a row: boots that failed or died within SETTLE of saying ready
    failed_at: float = 0.0  # when the last of them failed
    respawn_at: float = 0.0  # back-off after boot failures
    datagrams: Groups = field(default_factory=dict)  # UDP sockets (the app's), one per slot: slot k the k-th

    def move(self, to: GenerationState) -> None:
        if to not in GENERATION_TRANSITIONS[self.state]:
            raise TransitionError(f"generation {self.number}: {self.state.value} -> {to.value}")
        self.state = to

    def occupants(self, slot: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.slot == slot and w.occupies_slot]

    def empty_slots(self) -> list[int]:
        taken = {w.slot for w in self.workers.values() if w.occupies_slot}
        return [s for s in range(1, self.nworkers + 1) if s not in taken]

    def surplus(self) -> list[Worker]:
        """Workers in slots beyond nworkers (after TTOU)."""
        return [w for w in self.workers.values() if w.occupies_slot and w.slot > self.nworkers]

    def all_serving(self) -> bool:
        """Every slot has a serving worker."""
        serving = {w.slot for w in self.workers.values() if w.state is WorkerState.SERVING}
        return all(s in serving for s in range(1, self.nworkers + 1))

    def steady_since(self, when: float, settle: float) -> bool:
        """A worker that said ready after `when` has served `settle` seconds: boots work again."""
        now = time.monotonic()
        return any(w.state is WorkerState.SERVING and w.since > when and now - w.since >= settle
                   for w in self.workers.values())

    def serving_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state is WorkerState.SERVING)

    def recycling(self, slot: int) -> bool:
        """A successor is booting for this slot already."""
        return any(w.state is WorkerState.BOOTING for w in self.occupants(slot))
