"""The first-hour mistakes of issue 11, made with the real ``mosaic`` entry point: each one ends with one
sentence that names the problem, the right exit code, and no traceback. None of them starts Ray."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "mosaic"  # the console script pyproject installs
HEAVY = ("torch", "ray", "grpc", "transformers")


def mosaic(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    entry = [str(SCRIPT)] if SCRIPT.exists() else ["-m", "mosaic_core.cli"]
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), *entry]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOSAIC_REDIS_URL": "", "MOSAIC_API_KEY": ""}
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def error_sentence(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line; fails on a traceback, on several errors, or on more than one sentence."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    sentence = errors[0][len("error: ") :]
    assert sentence.endswith("."), sentence
    # one sentence: no full stop followed by a new capitalised sentence inside it
    assert not re.search(r"[.!?] [A-Z][a-z]", sentence.rstrip(".")), sentence
    return sentence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    """``mosaic serve`` on loopback with free ports, so only the mistake in ``args`` can fail preflight."""
    base = ["serve", "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0"]
    return mosaic(*base, *args, importtime=importtime)


def imported(result: subprocess.CompletedProcess) -> set[str]:
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture
def starting_router():
    """The router's gRPC service as it answers until its workers are up: its coordinator has none yet (no Ray)."""
    import grpc

    from services.coordinator import Coordinator
    from services.gen.mosaic.v1 import mosaic_pb2_grpc
    from services.metrics import MosaicMetrics
    from services.scheduler import QueryQueue
    from services.servicer import MosaicServicer

    async def start():
        server = grpc.aio.server()
        metrics = MosaicMetrics()
        queue = QueryQueue(max_waiting=4, max_running=1)
        servicer = MosaicServicer(
            Coordinator([], None, metrics), queue, metrics, mode="cluster", default_max_new_tokens=8, max_push_calls=4
        )
        mosaic_pb2_grpc.add_MosaicServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture
def listening_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("streams", "add", "cam-1", "--source", "rtsp://x/1", "--push"), "--push"),
        (("streams", "add", "cam-1"), "--source"),
        (("streams", "add", "cam-1", "--push", "--fps", "0"), "--fps"),
        (("demo", "--fps", "0"), "--fps"),
        (("demo", "--frames", "many"), "--frames"),
        (("serve", "--log-level", "LOUD"), "--log-level"),
        (("query", "--question", "hi?", "--timeout-s", "-1"), "--timeout-s"),
        (("query", "--question", "hi?", "--max-new-tokens", "99999999999"), "--max-new-tokens"),
        (("watch", "create", "--question", "Van?", "--max-answer-tokens", "99999999999"), "--max-answer-tokens"),
        (("watch", "tail", "--timeout-s", "-5"), "--timeout-s"),
        (("watch", "tail", "--count", "-1"), "--count"),
        (("push", "cam-1", "clip.mp4", "--max-frames", "-3"), "--max-frames"),
        (("no-such-command",), "no-such-command"),
    ],
)
def test_bad_arguments_are_one_sentence_with_exit_2(args, named):
    result = mosaic(*args)
    assert result.returncode == 2
    assert named in error_sentence(result)


def test_grpc_port_in_use_is_named_before_ray_starts(listening_port):
    result = serve("--grpc-port", str(listening_port), importtime=True)
    assert result.returncode == 2
    sentence = error_sentence(result)
    assert f"gRPC port {listening_port}" in sentence and "--grpc-port" in sentence
    assert "ray" not in imported(result)


def test_metrics_port_in_use_is_named(listening_port):
    result = serve("--metrics-port", str(listening_port))
    assert result.returncode == 2
    sentence = error_sentence(result)
    assert f"metrics port {listening_port}" in sentence and "--metrics-port" in sentence


def test_console_port_in_use_is_named_before_ray_starts(listening_port):
    result = serve("--console", "--console-port", str(listening_port), importtime=True)
    assert result.returncode == 2
    sentence = error_sentence(result)
    assert f"console port {listening_port}" in sentence and "--console-port" in sentence
    assert "ray" not in imported(result)


def test_console_on_the_grpc_port_is_named():
    port = str(free_port())
    result = serve("--grpc-port", port, "--console", "--console-port", port)
    assert result.returncode == 2
    assert "--grpc-port and --console-port are both" in error_sentence(result)


def test_redis_that_does_not_answer():
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = serve("--redis-url", url, importtime=True)
    assert result.returncode == 2
    assert f"Redis at {url} does not answer (Connection refused)" in error_sentence(result)
    assert "ray" not in imported(result)


def test_empty_checkpoint_directory_names_the_missing_files(tmp_path):
    result = serve("--model", str(tmp_path))
    assert result.returncode == 2
    sentence = error_sentence(result)
    assert str(tmp_path) in sentence and "config.json" in sentence and "model.safetensors" in sentence


def test_checkpoint_with_a_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    result = serve("--model", str(tmp_path))
    assert result.returncode == 2
    sentence = error_sentence(result)
    assert "model-00002-of-00002.safetensors" in sentence and "model-00001" not in sentence


def test_unknown_model_name():
    result = serve("--model", "qwen-7b")
    assert result.returncode == 2
    assert "'qwen-7b' is neither a preset" in error_sentence(result)


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/gpus"), reason="this machine has an NVIDIA GPU")
def test_worker_gpus_without_a_gpu():
    result = serve("--worker-gpus", "1")
    assert result.returncode == 2
    assert "--worker-gpus 1" in error_sentence(result)


def test_data_dir_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = serve("--data-dir", str(blocker / "history"))
    assert result.returncode == 2
    sentence = error_sentence(result)
    assert "data directory" in sentence and "--data-dir" in sentence


def test_cuda_device_on_a_machine_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = mosaic("ask-video", "bikes.mp4", "--question", "hi?", "--device", "cuda")
    assert result.returncode == 2
    assert "Device 'cuda' is not available" in error_sentence(result)


def test_missing_video_file_and_unknown_sample_clip_are_different_errors():
    missing = mosaic("ask-video", "videos/lobby.mp4", "--question", "hi?")
    assert missing.returncode == 2
    assert error_sentence(missing) == "Video file 'videos/lobby.mp4' does not exist."
    unknown = mosaic("ask-video", "bike.mp4", "--question", "hi?")
    assert unknown.returncode == 2
    sentence = error_sentence(unknown)
    assert "'bike.mp4'" in sentence and "not a sample clip" in sentence and "bikes.mp4" in sentence


def test_client_commands_without_a_server():
    target = f"127.0.0.1:{free_port()}"
    for args in (("streams",), ("query", "--question", "hi?"), ("streams", "add", "cam-1", "--push")):
        result = mosaic(*args, "--target", target)
        assert result.returncode == 1, result.stderr
        assert f"No Mosaic server answers at {target}" in error_sentence(result)


def test_a_server_that_is_starting_says_so_through_the_command_line(starting_router):
    result = mosaic("streams", "--target", starting_router)
    assert result.returncode == 1, result.stderr
    sentence = error_sentence(result)
    assert f"The server at {starting_router} cannot serve this now" in sentence and "is starting" in sentence


def test_a_question_that_cannot_be_encoded_is_one_sentence():
    result = mosaic("query", "--question", "gate \udcff", "--target", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    assert "cannot be sent to the server" in error_sentence(result)


def test_push_of_a_missing_path_or_an_empty_folder(tmp_path):
    missing = mosaic("push", "cam-1", str(tmp_path / "clip.mp4"))
    assert missing.returncode == 2
    assert "does not exist" in error_sentence(missing)
    folder = mosaic("push", "cam-1", str(tmp_path / "frames") + os.sep)
    assert folder.returncode == 2
    assert "does not exist" in error_sentence(folder)
    empty = mosaic("push", "cam-1", str(tmp_path))
    assert empty.returncode == 2
    assert "has no .jpg, .jpeg or .png images" in error_sentence(empty)


def test_version():
    result = mosaic("--version")
    assert result.returncode == 0 and re.fullmatch(r"mosaic \S+\n", result.stdout)
