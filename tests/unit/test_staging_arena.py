"""The staging arena hands out pieces of one buffer, merges what comes back, waits for room, and the durable store
gives a snapshot's piece back once its record file is written (never while a read could still use it)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from mosaic_core.durable.staging import ALIGN_BYTES, StagingArena
from mosaic_core.durable.store import DurableStore
from tests.engine.test_durable_writers import WAIT_S, Gate, _seal


def test_pieces_do_not_overlap_and_freed_neighbours_merge_into_one_run():
    arena = StagingArena(4 * ALIGN_BYTES, pin=False)
    pieces = [arena.take((ALIGN_BYTES // 2,), torch.bfloat16) for _ in range(4)]  # one aligned block each
    for i, piece in enumerate(pieces):
        piece.fill_(i)
    assert [int(p[0]) for p in pieces] == [0, 1, 2, 3]
    assert arena.taken_bytes == 4 * ALIGN_BYTES
    arena.give_back(pieces[1])
    arena.give_back(pieces[2])  # merges with the run of pieces[1]
    both = arena.take((2 * ALIGN_BYTES,), torch.uint8)  # only one run of two blocks can hold it
    assert both.data_ptr() == pieces[1].data_ptr()
    for piece in (pieces[0], pieces[3], both):
        arena.give_back(piece)
    assert arena.taken_bytes == 0
    assert arena.take((4 * ALIGN_BYTES,), torch.uint8).numel() == 4 * ALIGN_BYTES  # the whole arena again


def test_a_piece_keeps_its_shape_and_dtype_and_a_foreign_tensor_is_refused():
    arena = StagingArena(8 * ALIGN_BYTES, pin=False)
    piece = arena.take((2, 3, 5), torch.float32)
    assert piece.shape == (2, 3, 5) and piece.dtype == torch.float32 and arena.owns(piece)
    stranger = torch.zeros(4)
    assert not arena.owns(stranger)
    with pytest.raises(ValueError, match="no piece"):
        arena.give_back(piece[1])  # a view that does not start where the piece starts
    assert not arena.fits(9 * ALIGN_BYTES)
    with pytest.raises(ValueError, match="cannot fit"):
        arena.take((9 * ALIGN_BYTES,), torch.uint8)


def test_take_waits_until_another_thread_gives_enough_back():
    arena = StagingArena(2 * ALIGN_BYTES, pin=False)
    first = arena.take((ALIGN_BYTES,), torch.uint8)
    second = arena.take((ALIGN_BYTES,), torch.uint8)
    arena.hand_over(second)  # as the store does with a seal's piece: the writers give it back once written
    got: list[torch.Tensor] = []
    taker = threading.Thread(target=lambda: got.append(arena.take((ALIGN_BYTES,), torch.uint8)))
    taker.start()
    taker.join(0.3)
    assert taker.is_alive() and not got  # no room: it waits
    arena.give_back(second)
    taker.join(WAIT_S)
    assert got and got[0].data_ptr() == second.data_ptr()
    assert arena.wait_s > 0.2
    arena.give_back(first)


def test_a_piece_never_waits_for_room_only_pieces_not_handed_over_could_leave():
    arena = StagingArena(4 * ALIGN_BYTES, pin=False)
    first_half = arena.take((3 * ALIGN_BYTES,), torch.uint8)  # a split's first half, not handed over yet
    assert arena.fits(ALIGN_BYTES)
    assert not arena.fits(2 * ALIGN_BYTES)  # taken, it would wait for the first half, which never comes back
    with pytest.raises(ValueError, match="not handed over"):
        arena.take((2 * ALIGN_BYTES,), torch.uint8)
    arena.hand_over(first_half)
    assert arena.fits(2 * ALIGN_BYTES)  # the writers give it back once written
    arena.give_back(first_half)
    assert arena.fits(4 * ALIGN_BYTES) and arena.taken_bytes == 0


def _staged_seal(arena: StagingArena, stream_id: str, number: int, ready=None, *, tokens: int = 4):
    """A seal whose pages are staged as ``KVTiers.snapshot_pages`` stages them: in the arena where they fit, else
    outside it."""
    seal = _seal(stream_id, number, ready, tokens=tokens)
    if arena.fits(seal.num_bytes):
        staged = arena.take(seal.pages.shape, seal.pages.dtype)
        staged.copy_(seal.pages)
        seal.pages = staged
    return seal


@contextmanager
def _staged_store(tmp_path, *, arena_blocks: int = 64, **store_args):
    """A store with a staging arena and a stream "cam"; yields the arena, the store and a gate for a seal's copy."""
    arena = StagingArena(arena_blocks * ALIGN_BYTES, pin=False)
    store = DurableStore(tmp_path, staging=arena, **store_args)
    held = Gate()
    try:
        store.create_stream("cam", {"fps": 1.0})
        yield arena, store, held
    finally:
        held.open()  # a failed assertion must not leave the writer waiting
        store.close()


def test_the_store_gives_a_snapshot_back_once_durable_and_reads_of_a_pending_one_get_a_copy(tmp_path):
    with _staged_store(tmp_path) as (arena, store, held):
        seal = _staged_seal(arena, "cam", 1, held)
        store.submit("cam", add=[seal])
        assert held.reached.wait(WAIT_S)
        held.open()
        read = store.read_pages("cam/c000001")  # pending or, if the writer was quick, from its file
        assert not arena.owns(read) and torch.equal(read, torch.full_like(read, 1.0))
        assert store.flush(WAIT_S)
        assert arena.taken_bytes == 0
        assert torch.equal(store.read_pages("cam/c000001"), read)  # from the file now


def test_a_snapshot_goes_back_once_its_file_is_written_while_an_earlier_journal_line_waits(tmp_path):
    with _staged_store(tmp_path, writers=2) as (arena, store, held):
        first, second = _staged_seal(arena, "cam", 1, held), _staged_seal(arena, "cam", 2)
        first_bytes = arena.taken_bytes // 2
        store.submit("cam", add=[first])
        store.submit("cam", add=[second])
        assert held.reached.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while arena.taken_bytes > first_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert arena.taken_bytes == first_bytes, "the written snapshot waited for the journal line ahead of it"
        assert store.snapshot_stats().clusters_written == 0  # nothing journalled yet: the first file is held
        read = store.read_pages("cam/c000002")  # still pending: read from its file
        assert torch.equal(read, torch.full_like(read, 2.0))
        held.open()
        assert store.flush(WAIT_S)
        assert arena.taken_bytes == 0 and store.snapshot_stats().pending_bytes == 0


def test_deleting_a_stream_gives_back_its_pending_snapshots_after_their_writes_stop(tmp_path):
    with _staged_store(tmp_path, writers=1) as (arena, store, held):
        store.submit("cam", add=[_staged_seal(arena, "cam", 1, held), _staged_seal(arena, "cam", 2)])
        assert held.reached.wait(WAIT_S)
        deleting = threading.Thread(target=store.delete_stream, args=("cam",))
        deleting.start()
        deleting.join(0.3)
        assert deleting.is_alive() and arena.taken_bytes > 0  # the write under way still reads its snapshot
        held.open()
        deleting.join(WAIT_S)
        assert not deleting.is_alive() and arena.taken_bytes == 0


def _split(
    arena: StagingArena, store: DurableStore, numbers: tuple[int, int], tokens: tuple[int, int]
) -> threading.Thread:
    """A split on its own thread, as the engine makes one: both halves staged, then handed over in one commit."""

    def split() -> None:
        halves = [_staged_seal(arena, "cam", n, tokens=t) for n, t in zip(numbers, tokens, strict=True)]
        store.submit("cam", add=halves, remove=[])

    thread = threading.Thread(target=split, daemon=True)  # daemon: a wait that never ends must not hold pytest
    thread.start()
    return thread


def test_a_split_s_second_half_never_waits_for_room_its_first_half_holds(tmp_path):
    """The arena is smaller than the cluster split: the second half fits only where the first half's piece and an
    earlier snapshot's together would leave room, which the first half never gives back before the commit is handed
    over. It is taken outside the arena, without waiting, and both halves are written."""
    with _staged_store(tmp_path, arena_blocks=4, writers=1) as (arena, store, held):
        store.submit("cam", add=[_staged_seal(arena, "cam", 1, held, tokens=8)])  # 1 block, held by its writer
        assert held.reached.wait(WAIT_S)
        split = _split(arena, store, (2, 3), (16, 16))  # 2 blocks each: the second can never find a run of 2
        split.join(WAIT_S)
        assert not split.is_alive(), "the second half waited for room that cannot come"
        held.open()
        assert store.flush(WAIT_S) and arena.taken_bytes == 0
        for number in (2, 3):
            pages = store.read_pages(f"cam/c{number:06d}")
            assert torch.equal(pages, torch.full_like(pages, float(number)))


def test_a_split_s_second_half_waits_for_room_the_writers_give_back(tmp_path):
    with _staged_store(tmp_path, arena_blocks=4, writers=1) as (arena, store, held):
        store.submit("cam", add=[_staged_seal(arena, "cam", 1, held, tokens=16)])  # 2 blocks, held by its writer
        assert held.reached.wait(WAIT_S)
        split = _split(arena, store, (2, 3), (8, 16))  # the second half's 2 blocks come back with the first seal's
        split.join(0.3)
        assert split.is_alive()  # waiting for the writer
        held.open()
        split.join(WAIT_S)
        assert not split.is_alive() and store.flush(WAIT_S) and arena.taken_bytes == 0
        assert arena.wait_s > 0.2  # it was staged in the arena, once the room came
