"""``mosaic push``'s last line: what the call sent is accepted, rejected or sampled out to the stream's fps."""

from __future__ import annotations

from services.cli_streams import push_summary
from services.gen.mosaic.v1 import mosaic_pb2 as pb


def test_the_summary_names_frames_sampled_out_to_the_streams_fps():
    response = pb.PushFramesResponse(frames_accepted=4, frames_dropped=1, frames_rejected=2, frames_sampled_out=4)
    line = push_summary("lobby", response, stream_fps=2.0)
    assert line == "pushed to lobby: 4 accepted, 1 dropped, 2 rejected, 4 sampled out to 2 frames/s"


def test_the_summary_says_nothing_of_sampling_when_every_frame_was_accepted_or_rejected():
    response = pb.PushFramesResponse(frames_accepted=6, frames_dropped=0, frames_rejected=1)
    assert push_summary("lobby", response, stream_fps=2.0) == "pushed to lobby: 6 accepted, 0 dropped, 1 rejected"
