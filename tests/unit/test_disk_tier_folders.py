"""The disk tier's folders: one per stream while it has spill files, none left once they are gone.

A spill file lives in ``<disk_dir>/<stream_id>/``. A service that runs for months creates and deletes streams all day;
a folder left behind by each stream that ever spilled would pile up without end (a directory block each, and a
longer walk for the start-up ``clear``).
"""

from __future__ import annotations

import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.memory.disk_tier import DiskTier
from mosaic_core.memory.layout import KVSpec
from tests.unit.tiering_helpers import make_tiering, move, put

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=2, head_dim=8, dtype=torch.float32)


def _kv(num_tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, num_tokens, SPEC.head_dim,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip


def test_deleted_streams_leave_no_folder_in_the_disk_tier(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4)
    for n in range(5):
        stream_id = f"cam-{n}"
        for number in range(2):
            placed = tiering.admit(f"{stream_id}/c00000{number}", stream_id, _kv(8, 2 * n + number), prefer=Tier.DISK)
            assert placed is Tier.DISK
        assert (tmp_path / stream_id).is_dir()
        tiering.drop_stream(stream_id)  # the stream is deleted
    assert list(tmp_path.iterdir()) == []


def test_a_stream_keeps_its_folder_while_a_spill_file_is_in_it(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4)
    put(tiering, "cam/c000000", _kv(8, 0), Tier.DISK)
    put(tiering, "cam/c000001", _kv(8, 1), Tier.DISK)
    move(tiering, "cam/c000000", Tier.HOST)  # fetched: its file goes, the other stays
    assert DiskTier(tmp_path).list_clusters("cam") == ["cam/c000001"]
    move(tiering, "cam/c000001", Tier.HOST)
    assert list(tmp_path.iterdir()) == []
    move(tiering, "cam/c000001", Tier.DISK)  # a later spill makes the folder again
    assert DiskTier(tmp_path).list_clusters("cam") == ["cam/c000001"]


def test_the_start_up_clear_leaves_no_empty_stream_folder_and_keeps_the_others(tmp_path):
    earlier = DiskTier(tmp_path)
    earlier.write("cam/c000001", torch.randn(2, 2, 1, 5, 4))
    earlier.write("kept/c000001", torch.randn(2, 2, 1, 5, 4))
    (tmp_path / "kept" / "c000001.mkv").write_bytes(b"a durable record")
    assert DiskTier(tmp_path).clear() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
