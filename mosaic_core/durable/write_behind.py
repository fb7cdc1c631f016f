"""How ``DurableStore`` writes behind: the writer pool's record files and the commit thread's queue.

Record files are written by the pool as soon as their commit is queued; the commit thread runs the queue in order,
appending each commit's journal line once its files are on disk, and writes changed stream states every
``state_interval_s`` (the store's module doc draws the threads). ``WriteBehindMixin`` is mixed into ``DurableStore``: it
shares the store's lock, queue, pending snapshots and stats, which the store's ``__init__`` sets up.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mosaic_core.durable.manifest import STATE_NAME, ClusterEntry, ManifestWriter, write_atomic
from mosaic_core.durable.records import ClusterSummary, encode_pages

log = logging.getLogger(__name__)
RETRY_S = (0.1, 0.5, 2.0, 5.0)  # pauses before the first retries of a failed write; the last repeats
FAILURES_PER_LOG = 12  # past the first few, one failed attempt in this many is logged (about one a minute)


@dataclass(slots=True)
class Seal:
    """A cluster handed to the writer: its manifest entry (checksum filled in on write) and KV snapshot."""

    entry: ClusterEntry
    # [P, L, 2, H, page_tokens, D] on the host (being filled until ``ready`` passes, under CUDA); None once the record
    # file holds them, which is then read instead
    pages: torch.Tensor | None
    summary: ClusterSummary
    ready: object = None  # torch.cuda.Event or None
    submitted_s: float = field(default_factory=time.monotonic)
    keyframes: bytes = b""  # JPEGs back to back, as ``entry.keyframes`` lists them
    written: Future | None = None  # its record file's write in the writer pool (queued again after a failure)
    num_bytes: int = field(init=False)  # the snapshot's

    def __post_init__(self) -> None:
        self.num_bytes = self.pages.numel() * self.pages.element_size()


@dataclass(slots=True)
class Commit:
    stream_id: str
    add: list[Seal]
    remove: list[str]
    # The stream's journal when the commit was queued: a stream deleted and opened again under its id has another,
    # and the commit then belongs to neither.
    writer: ManifestWriter | None
    # Once, before its first try: a retry finds the removed clusters gone from the journal's state already.
    removed_files: list[str] | None = None
    journalled: bool = False  # its line is on disk: a retry only unlinks what it removed


class WriteBehindMixin:
    """The writer half of ``DurableStore`` (module doc): the commit thread's loop and the writer pool's files."""

    def _enqueue(self, op) -> None:
        with self._cv:
            self._queue.append(op)
            self._cv.notify_all()

    def _run(self) -> None:
        last_state_s = 0.0
        while True:
            with self._cv:
                while (
                    not self._queue
                    and not self._stop
                    and not (self._dirty and time.monotonic() - last_state_s >= self.state_interval_s)
                ):
                    self._cv.wait(self.state_interval_s / 2)
                if self._stop and not self._queue:
                    return
                op = self._queue[0] if self._queue else None
                self._busy = op is not None
            if op is not None:
                self._run_with_retry(op)
            if time.monotonic() - last_state_s >= self.state_interval_s or op is None:
                self._write_states()
                last_state_s = time.monotonic()

    def _run_with_retry(self, op) -> None:
        """Runs one queued op until it succeeds, its stream is deleted or the store closes: a failed write (disk
        full, an I/O error) is retried, the pause growing to the last of ``RETRY_S``, for as long as it fails.
        Meanwhile the commits behind it wait, and so, past ``max_pending_bytes``, does ``submit``: ingest is held
        back, and nothing sealed is dropped."""
        attempt = 0
        while True:
            try:
                if isinstance(op, Path):
                    shutil.rmtree(op, ignore_errors=True)  # in the trash: nothing else touches it
                else:
                    self._await_files(op)
                    with self._io:
                        if self._owned(op):
                            self._commit(op)
                        else:  # the stream was deleted meanwhile: its snapshots go with it, once no write reads them
                            wait_for_futures([seal.written for seal in op.add if seal.written is not None])
                            with self._cv:
                                for seal in op.add:
                                    self._forget_pending(seal)
                break
            except Exception as err:  # an OSError may pass; anything else must not end the writer either
                with self._cv:
                    self.stats.write_errors += 1
                    self.stats.last_error = f"{type(err).__name__}: {err}"
                if attempt < len(RETRY_S) or attempt % FAILURES_PER_LOG == 0:
                    log.error("durable write failed (attempt %d, retrying until it succeeds): %s", attempt + 1, err)
                if self._stop:
                    log.error("the store is closing: %s stays unwritten after %d attempts", op, attempt + 1)
                    break
                self.empty_trash()  # a full disk gets its room from a delete queued behind this op
                time.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
        with self._cv:
            if self._queue and self._queue[0] is op:
                self._queue.popleft()
            self._busy = False
            self._cv.notify_all()

    def empty_trash(self) -> None:
        """Removes now, out of their turn in the queue, the folders of deleted streams that wait in the trash: a
        rename into the trash frees no byte, and a commit that fails for want of room (retried at the queue's head)
        must not hold back the removal that gives it that room. Safe from any thread: each folder is taken off the
        queue, under the lock, by one caller."""
        with self._cv:
            folders = [op for op in self._queue if isinstance(op, Path)]
            if not folders:
                return
            self._queue = deque(op for op in self._queue if not isinstance(op, Path))
            self._emptying += 1  # ``flush`` waits for them as it would for the queue
        try:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)  # in the trash: nothing else touches it
        finally:
            with self._cv:
                self._emptying -= 1
                self._cv.notify_all()

    def _write_record(self, stream_dir: Path, seal: Seal) -> None:
        """One record file, on disk before this returns (on a pool thread)."""
        started = time.monotonic()
        if seal.ready is not None:
            seal.ready.synchronize()
        chunks, checksum = encode_pages(seal.pages, seal.summary, keyframes=seal.keyframes)
        seal.entry.checksum = checksum
        write_atomic(stream_dir / seal.entry.file, chunks)
        with self._cv:
            self.stats.bytes_written += sum(memoryview(chunk).nbytes for chunk in chunks)
            self.stats.file_write_s += time.monotonic() - started
            self._let_go(seal)  # the file holds the bytes now, whenever the commit thread names it

    def _await_files(self, commit: Commit) -> None:
        """Until the commit's record files are on disk. A failed write is queued again and its error raised, so
        the retry loop around this counts it and, after its pause, waits for the new write."""
        for seal in commit.add:
            try:
                seal.written.result()
            except Exception:  # a failed write, or one that deleting the stream cancelled
                with self._cv:  # ``delete_stream`` collects the writes to cancel under this lock
                    if not self._owned(commit):
                        return  # the stream was deleted meanwhile: its files are gone with it
                    seal.written = self._files.submit(self._write_record, self.stream_dir(commit.stream_id), seal)
                raise

    def _owned(self, commit: Commit) -> bool:
        """Whether the journal the commit was queued for is still its stream's."""
        return self._current(commit.stream_id, commit.writer)

    def _current(self, stream_id: str, writer: ManifestWriter | None) -> bool:
        """Whether ``writer`` is still the stream's journal (not one of a stream deleted, or opened again)."""
        return writer is not None and self._writers.get(stream_id) is writer

    def _commit(self, commit: Commit) -> None:
        """Journals one commit, then unlinks the files it removed; run again after a failure, it goes on from
        where that one stopped."""
        writer = commit.writer
        if commit.removed_files is None:
            commit.removed_files = [writer.state.clusters[c].file for c in commit.remove if c in writer.state.clusters]
        if not commit.journalled:
            entries = [asdict(seal.entry) for seal in commit.add]
            writer.append({"op": "commit", "add": entries, "remove": commit.remove})
            commit.journalled = True
        for name in commit.removed_files:
            (writer.stream_dir / name).unlink(missing_ok=True)
        now = time.monotonic()
        with self._cv:
            for seal in commit.add:
                latency = now - seal.submitted_s
                self.stats.clusters_written += 1
                self.stats.seal_to_durable_s_sum += latency
                self.stats.seal_to_durable_s_max = max(self.stats.seal_to_durable_s_max, latency)
                self._forget_pending(seal)

    def _forget_pending(self, seal: Seal) -> None:
        if self._pending.pop(seal.entry.cluster_id, None) is not None:
            self.stats.pending_clusters -= 1
            self._let_go(seal)

    def _let_go(self, seal: Seal) -> None:
        """Frees a snapshot's memory (its staging piece) and its bytes from the pending bound, once (under the lock)."""
        if seal.pages is None:
            return
        self.stats.pending_bytes -= seal.num_bytes
        if self.staging is not None and self.staging.owns(seal.pages):
            self.staging.give_back(seal.pages)
        seal.pages = None

    def _write_states(self) -> None:
        with self._cv:  # each state with its journal: a stream opened again under its id has another
            dirty = {sid: self._writers.get(sid) for sid in self._dirty if sid in self._states}
            self._dirty.clear()
            self._writing_states = True
        for stream_id, writer in dirty.items():
            with self._io:
                with self._cv:  # taken now, under the lock ``write_state`` writes under: never older than its write
                    state = dict(self._states.get(stream_id, {}))
                if not self._current(stream_id, writer):
                    continue
                try:
                    write_atomic(self.stream_dir(stream_id) / STATE_NAME, json_bytes(state))
                    self._state_failures = 0
                except Exception as err:  # an OSError, or anything else, must not end the writer
                    with self._cv:  # counted, and written again at the next interval (the newest state then)
                        self.stats.write_errors += 1
                        self.stats.last_error = f"{type(err).__name__}: {err}"
                        self._dirty.add(stream_id)
                        self._state_failures += 1
                        failures = self._state_failures
                    if failures <= len(RETRY_S) or failures % FAILURES_PER_LOG == 0:
                        log.error("could not write the state of stream %s (failure %d, retried): %s", stream_id,
                                  failures, err)  # fmt: skip
        with self._cv:
            self._writing_states = False
            self._cv.notify_all()


def json_bytes(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True).encode()
