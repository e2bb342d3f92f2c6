"""The master's state tables: the only moves allowed, and what supervision reads from them."""

from __future__ import annotations

import socket

import pytest

from transocks.runtime.generation import (
    GENERATION_TRANSITIONS,
    WORKER_TRANSITIONS,
    Generation,
    GenerationState,
    TransitionError,
    Worker,
    WorkerState,
)


@pytest.fixture
def gen():
    return Generation(1, None, {}, 2)


def worker(gen: Generation, pid: int, slot: int, state: WorkerState = WorkerState.BOOTING) -> Worker:
    a, b = socket.socketpair()
    b.close()
    w = Worker(pid, slot, gen, a, 0.0)
    gen.workers[pid] = w
    if state is not WorkerState.BOOTING:
        w.move(state)
    return w


@pytest.mark.parametrize("frm", list(WorkerState))
@pytest.mark.parametrize("to", list(WorkerState))
def test_worker_moves_follow_the_table(gen, frm, to):
    w = worker(gen, 1, 1)
    w.state = frm
    if to in WORKER_TRANSITIONS[frm]:
        w.move(to)
        assert w.state is to
    else:
        with pytest.raises(TransitionError):
            w.move(to)
    w.ctrl.close()


def test_gone_and_retiring_are_final_for_their_tables():
    assert not WORKER_TRANSITIONS[WorkerState.GONE]
    assert WorkerState.SERVING not in WORKER_TRANSITIONS[WorkerState.RETIRING]
    assert not GENERATION_TRANSITIONS[GenerationState.RETIRING]
    g = Generation(1, None, {}, 1, GenerationState.SERVING)
    g.move(GenerationState.RETIRING)
    with pytest.raises(TransitionError):
        g.move(GenerationState.SERVING)


def test_a_recycled_worker_keeps_its_slot_until_its_successor_serves(gen):
    old = worker(gen, 10, 1, WorkerState.SERVING)
    worker(gen, 11, 2, WorkerState.SERVING)
    successor = worker(gen, 12, 1)
    assert gen.recycling(1) and not gen.recycling(2)
    assert gen.empty_slots() == [] and gen.all_serving()
    successor.move(WorkerState.GONE)  # failed to boot: the old one still holds the slot
    del gen.workers[12]
    assert gen.empty_slots() == [] and not gen.recycling(1)
    old.move(WorkerState.KILLED)  # hung: the slot is free for a replacement at once
    assert gen.empty_slots() == [1] and not gen.all_serving()
    for w in gen.workers.values():
        w.ctrl.close()


def test_surplus_after_ttou(gen):
    worker(gen, 1, 1, WorkerState.SERVING)
    w2 = worker(gen, 2, 2, WorkerState.SERVING)
    gen.nworkers = 1
    assert gen.surplus() == [w2]
    for w in gen.workers.values():
        w.ctrl.close()
