"""Minimal Mosaic gRPC client: register a camera, push a few frames, ask a question, print the answer.

Uses only the generated stubs (services/gen, installed with the mosaic package or found with PYTHONPATH set to
the repository root), so it is also a template for clients in other languages:

    kubectl -n mosaic port-forward service/mosaic-router 50051
    python deploy/examples/client.py --target localhost:50051 --stream cam-1 \
        --question "What moved in front of the camera?"

With auth and TLS on: add --api-key "$KEY" --tls-ca ca.crt. With --source-url (a file, http(s) or rtsp://
address) Mosaic pulls the frames itself instead of the pushed synthetic ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import grpc
import numpy as np

from services.gen.mosaic.v1 import mosaic_pb2, mosaic_pb2_grpc


def synthetic_frames(stream_id: str, *, num_frames: int, height: int = 224, width: int = 224) -> Iterator:
    """A square sliding across a grey background, as raw RGB frames one second apart in wall-clock time."""
    start_s = time.time() - num_frames
    for i in range(num_frames):
        rgb = np.full((height, width, 3), 96, dtype=np.uint8)
        x = (i * 16) % (width - 48)
        rgb[80:128, x : x + 48] = (220, 40, 40)
        raw = mosaic_pb2.RawFrame(rgb=rgb.tobytes(), height=height, width=width, channels=3)
        yield mosaic_pb2.Frame(stream_id=stream_id, timestamp_s=start_s + i, raw=raw)


def open_channel(target: str, tls_ca: str | None) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
    if tls_ca is None:
        return grpc.insecure_channel(target, options=options)
    with open(tls_ca, "rb") as f:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()), options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051", help="router address host:port")
    parser.add_argument("--stream", default="example-cam", help="stream id to create (reused if it exists)")
    parser.add_argument("--question", default="What happened on this camera?")
    parser.add_argument("--frames", type=int, default=16, help="synthetic frames to push")
    parser.add_argument("--source-url", help="let Mosaic pull this file/URL/RTSP source instead of pushing")
    parser.add_argument("--api-key", help="value of the x-api-key header when auth is on")
    parser.add_argument("--tls-ca", help="PEM CA bundle; switches to TLS")
    args = parser.parse_args(argv)

    metadata = [("x-api-key", args.api_key)] if args.api_key else []
    with open_channel(args.target, args.tls_ca) as channel:
        stub = mosaic_pb2_grpc.MosaicStub(channel)
        request = mosaic_pb2.CreateStreamRequest(stream_id=args.stream, fps=1.0, source_url=args.source_url)
        try:
            stub.CreateStream(request, metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        if not args.source_url:
            pushed = stub.PushFrames(synthetic_frames(args.stream, num_frames=args.frames), metadata=metadata)
            print(f"pushed: accepted={pushed.frames_accepted} rejected={pushed.frames_rejected}")
        query = mosaic_pb2.QueryRequest(stream_ids=[args.stream], question=args.question, max_new_tokens=64)
        for event in stub.Query(query, metadata=metadata, timeout=120):
            kind = event.WhichOneof("event")
            if kind == "evidence":
                for span in event.evidence.spans:
                    print(f"evidence #{span.rank}: {span.stream_id} {span.start_s:.1f}-{span.end_s:.1f} s")
            elif kind == "token":
                print(event.token.text, end="", flush=True)
            elif kind == "timings":
                t = event.timings
                print(f"\nttft={t.time_to_first_token_s * 1e3:.0f} ms tokens={t.num_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
