"""A record or stream folder set aside as unreadable is moved under ``.unreadable``, every folder entry on disk."""

from __future__ import annotations

from mosaic_core.durable.checks import UNREADABLE, move_aside


def test_the_unreadable_folder_is_synced_into_the_data_folder_before_anything_moves_in(tmp_path, synced_dirs):
    synced = synced_dirs
    stream = tmp_path / "cam"
    stream.mkdir()
    (stream / "c-1.record").write_bytes(b"torn")
    (stream / "c-2.record").write_bytes(b"torn")
    first = move_aside(tmp_path, stream / "c-1.record", "cam-c-1")
    aside = str(tmp_path / UNREADABLE)
    assert synced == [str(tmp_path), str(stream), aside]  # its entry made, then the rename's two sides
    assert first.read_bytes() == b"torn" and first.parent == tmp_path / UNREADABLE
    move_aside(tmp_path, stream / "c-2.record", "cam-c-2")
    assert synced[3:] == [str(stream), aside]  # the folder is there already
