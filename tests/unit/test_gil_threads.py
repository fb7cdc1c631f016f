"""bench.gil_threads sums py-spy's GIL samples by thread kind: a thread's name less its number."""

from __future__ import annotations

from bench.gil_threads import thread_kinds


def test_samples_are_summed_by_thread_name_less_its_number():
    raw = "\n".join(
        [
            "thread (101): engine-loop;_run (services/engine_loop.py:250) 7",
            "thread (102): source-pull-009;_sample_pass (mosaic_core/model/video.py:249) 3",
            "thread (103): source-pull-010;_sample_pass (mosaic_core/model/video.py:249) 2",
            "thread (104): durable-file_2;encode_pages (mosaic_core/durable/records.py:86) 1",
            "thread (105): Dummy-12;thread (ray/_private/worker.py:1) 4",
        ]
    )
    assert thread_kinds(raw) == {"engine-loop": 7, "source-pull": 5, "Dummy": 4, "durable-file": 1}
