"""``mosaic query --save-evidence``: file names come from camera and time, and never leave the directory."""

from __future__ import annotations

import os

import pytest

from services.cli_evidence import EvidencePathError, evidence_path, write_keyframe


def test_names_are_camera_and_time(tmp_path):
    assert evidence_path(tmp_path, "cam-1", 41.0) == tmp_path.resolve() / "cam-1_41.000s.jpg"
    assert evidence_path(tmp_path, "gate.2", 1733050841.25).name == "gate.2_1733050841.250s.jpg"


@pytest.mark.parametrize("stream_id", ["../up", "/abs", "a/b", "..", "", "cam\n", "x" * 129])
def test_a_stream_id_that_could_name_a_path_is_refused(tmp_path, stream_id):
    with pytest.raises(EvidencePathError, match="not a valid stream id"):
        evidence_path(tmp_path, stream_id, 1.0)


@pytest.mark.parametrize("timestamp_s", [float("nan"), float("inf")])
def test_a_timestamp_that_is_not_a_number_is_refused(tmp_path, timestamp_s):
    with pytest.raises(EvidencePathError):
        evidence_path(tmp_path, "cam", timestamp_s)


def test_a_symlink_left_in_the_directory_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    inside = tmp_path / "evidence"
    inside.mkdir()
    os.symlink(outside, inside / "cam_1.000s.jpg")
    with pytest.raises(OSError):
        write_keyframe(inside / "cam_1.000s.jpg", b"\xff\xd8jpeg")
    assert outside.read_text() == "keep"


def test_two_keyframes_of_a_camera_at_one_millisecond_are_both_written(tmp_path):
    from types import SimpleNamespace

    from mosaic_core.engine.keyframes import Keyframe
    from services.cli_evidence import save_evidence

    def keyframe(index: int, jpeg: bytes) -> Keyframe:
        return Keyframe(f"cam/f{index}", "cam", "cam/c000000", index, 41.0001 * (1 + index * 1e-7), jpeg, 8, 8)

    class Client:  # GetKeyframes of a server that holds both
        def get_keyframes(self, stream_id, keyframe_ids):
            return [keyframe(int(k.split("/f")[1]), k.encode()) for k in keyframe_ids]

    span = SimpleNamespace(stream_id="cam", keyframe_ids=["cam/f7", "cam/f8"])  # an EvidenceSpan's fields it reads
    written, gone = save_evidence(Client(), [span], tmp_path)
    assert [p.name for p in written] == ["cam_41.000s.jpg", "cam_41.000s_f8.jpg"] and not gone
    assert [p.read_bytes() for p in written] == [b"cam/f7", b"cam/f8"]


def test_keyframes_too_large_for_one_reply_are_asked_for_in_halves(tmp_path):
    from types import SimpleNamespace

    import grpc

    from mosaic_core.engine.keyframes import Keyframe
    from services.cli_evidence import save_evidence

    class TooLarge(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

    class Client:  # GetKeyframes of a server whose replies hold at most 1,000 bytes of JPEG
        calls = 0

        def get_keyframes(self, stream_id, keyframe_ids):
            self.calls += 1
            if 300 * len(keyframe_ids) > 1000:
                raise TooLarge()
            return [Keyframe(k, "cam", "cam/c000000", int(k[5:]), float(k[5:]), b"j" * 300, 8, 8) for k in keyframe_ids]

    client = Client()
    span = SimpleNamespace(stream_id="cam", keyframe_ids=[f"cam/f{i}" for i in range(10)])
    written, gone = save_evidence(client, [span], tmp_path)
    assert [p.name for p in written] == [f"cam_{i}.000s.jpg" for i in range(10)] and not gone
    assert client.calls < 20


def test_nothing_to_save_leaves_no_directory(tmp_path):
    from types import SimpleNamespace

    from services.cli_evidence import save_evidence

    class Client:  # a server that holds none of them
        def get_keyframes(self, stream_id, keyframe_ids):
            raise AssertionError("no ids, no call")

    written, gone = save_evidence(Client(), [SimpleNamespace(stream_id="cam", keyframe_ids=[])], tmp_path / "ev")
    assert (written, gone) == ([], []) and not (tmp_path / "ev").exists()  # the CLI says it is unchanged
