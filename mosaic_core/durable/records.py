"""One sealed cluster, one file: its KV pages in order, its key summary, and a checksum over both.

The file is a safetensors file (a JSON header, then raw tensors), so any tool can open it:

    pages      [num_pages, num_layers, 2, num_kv_heads, page_tokens, head_dim]   one page per frame, in order
    key_sum    [num_layers, num_kv_heads, head_dim] float32                      the summary the retriever scores
    key_sumsq  [num_layers, num_kv_heads, head_dim] float32
    key_count  [1] float32
    keyframes  [num_bytes] uint8       the cluster's JPEG keyframes back to back (only if it has any; the
                                       manifest entry says where each one starts)

Pages are frame-sized and page-major on disk, as the arena's pools hold them, so a page is one contiguous run of
bytes both ways: a sealed cluster whose frames fill its pages is written from a gather of its pool pages, without
a permute. The header's metadata carries the format tag and the payload checksum (CRC-32 of the tensors' bytes in
the order above), which ``read_cluster`` checks. ``encode_pages`` writes the safetensors layout itself, as a header
and views of the tensors' memory, so a 58 MB cluster is not copied twice into one ``bytes`` before it is written.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import torch
from safetensors.torch import load

from mosaic_core.errors import MosaicError

FORMAT = "mosaic.cluster/1"


class CorruptRecordError(MosaicError):
    """A cluster record file is unreadable, or its bytes do not match their checksum."""

    grpc_code = "DATA_LOSS"


@dataclass(slots=True)
class ClusterSummary:
    """Per layer and KV head: the sum and sum of squares of the cluster's keys, and their count."""

    key_sum: torch.Tensor  # [num_layers, num_kv_heads, head_dim] float32
    key_sumsq: torch.Tensor  # [num_layers, num_kv_heads, head_dim] float32
    key_count: float


def to_pages(kv: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """``[L, 2, H, n, D]`` -> ``[n // page_tokens, L, 2, H, page_tokens, D]`` (contiguous)."""
    num_layers, two, heads, num_tokens, head_dim = kv.shape
    assert num_tokens % page_tokens == 0, f"{num_tokens} tokens are not whole pages of {page_tokens}"
    pages = kv.reshape(num_layers, two, heads, num_tokens // page_tokens, page_tokens, head_dim)
    return pages.permute(3, 0, 1, 2, 4, 5).contiguous()


def from_pages(pages: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_pages``."""
    num_pages, num_layers, two, heads, page_tokens, head_dim = pages.shape
    kv = pages.permute(1, 2, 3, 0, 4, 5).reshape(num_layers, two, heads, num_pages * page_tokens, head_dim)
    return kv.contiguous()


def payload_checksum(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in ("pages", "key_sum", "key_sumsq", "key_count", "keyframes"):
        if name in tensors:  # keyframes are optional: a record without them checks as before
            crc = zlib.crc32(tensors[name].contiguous().view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


def encode_pages(
    pages: torch.Tensor, summary: ClusterSummary, *, keyframes: bytes = b""
) -> tuple[list[bytes | memoryview], str]:
    """The file as chunks to write in order (a safetensors header, then views of the tensors' own memory) and
    the payload checksum, from host pages ``[P, L, 2, H, page_tokens, D]`` (and the cluster's keyframe JPEGs back
    to back, if any)."""
    tensors = {
        "pages": pages.contiguous(),
        "key_sum": summary.key_sum.float().cpu().contiguous(),
        "key_sumsq": summary.key_sumsq.float().cpu().contiguous(),
        "key_count": torch.tensor([summary.key_count], dtype=torch.float32),
    }
    if keyframes:
        tensors["keyframes"] = torch.frombuffer(bytearray(keyframes), dtype=torch.uint8)
    checksum = payload_checksum(tensors)
    header: dict = {"__metadata__": {"format": FORMAT, "checksum": checksum}}
    views, offset = [], 0
    for name, tensor in tensors.items():
        view = tensor.view(-1).view(torch.uint8).numpy().data
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        views.append(view)
        offset += view.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return [struct.pack("<Q", len(text)) + text, *views], checksum


_SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.uint8: "U8",
}


def decode_cluster(data: bytes, *, expect_checksum: str | None, name: str) -> tuple[torch.Tensor, ClusterSummary]:
    """``(kv [L, 2, H, n, D], summary)`` from a record file's bytes, checked against its checksum."""
    pages, summary = decode_pages(data, expect_checksum=expect_checksum, name=name)
    return from_pages(pages), summary


def decode_pages(data: bytes, *, expect_checksum: str | None, name: str) -> tuple[torch.Tensor, ClusterSummary]:
    """``(pages [P, L, 2, H, page_tokens, D], summary)`` from a record file's bytes, checked against its
    checksum: the pages as stored, each one contiguous run, for the arena to copy page by page."""
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types for a truncated or garbled header
        raise CorruptRecordError(f"cluster record {name} cannot be read: {err}") from err
    missing = {"pages", "key_sum", "key_sumsq", "key_count"} - tensors.keys()
    if missing:
        raise CorruptRecordError(f"cluster record {name} lacks {sorted(missing)}")
    actual = payload_checksum(tensors)
    if expect_checksum is not None and actual != expect_checksum:
        raise CorruptRecordError(
            f"cluster record {name} is corrupt: checksum {actual} does not match the manifest's {expect_checksum}"
        )
    summary = ClusterSummary(tensors["key_sum"], tensors["key_sumsq"], float(tensors["key_count"][0]))
    return tensors["pages"], summary
