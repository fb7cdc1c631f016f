"""The vision tower for a batch of equal-sized frames: per-batch inputs kept per frame grid, MLP widths aligned,
the patch embedding as one matrix product.

Three things make transformers' Qwen2.5-VL tower slow on a batch of camera frames, and none changes what it computes:

- **Per-batch inputs.** Every call rebuilds the rotary position ids, the window order and the chunk bounds with a
  Python loop over frames and reads them back from the device. For a batch of ``N`` frames of one grid they are
  always the same, so ``TowerInputs`` keeps them per ``(grid, N)`` and the tower takes them precomputed (the
  ``kwargs`` transformers' vision forward pops before computing its own).
- **MLP width.** The 7B tower's MLP is 3,420 wide. A bf16 row of 3,420 values is not a multiple of 16 bytes, so
  cuBLAS cannot use its Hopper kernels for those matrix products and falls back to an older, slower one.
  ``pad_mlp_widths`` widens the MLPs to a multiple of 64 with zero rows and columns: the extra units' gate and
  up outputs are zero (zero weights and bias), so their product is zero and adds nothing through the zero
  columns of the down projection.
- **Patch embedding.** transformers embeds patches with a ``Conv3d`` whose kernel equals its stride, so each
  output is one patch's 3 x 2 x 14 x 14 = 1,176 values dotted with a filter: a matrix product of the flattened
  patches with the flattened weight. cuDNN ran it as a convolution (about 8.6 ms per 128-frame pass on an H200,
  for about 0.2 TFLOP); ``embed_patches_by_matmul`` swaps in ``MatmulPatchEmbed``, which makes it one
  ``F.linear`` (the same on every device, so the swap needs no device check).

On CUDA, ``fuse_elementwise`` also swaps each RMSNorm and MLP for one whose element-wise work (float32 norm,
SiLU gate, bias) is a function compiled once with ``torch.compile`` for every block: transformers' modules run
each element-wise op as a kernel of its own over the whole batch. The attention's rotary step runs a Triton
kernel on CUDA instead (see ``vision_attention``); ``fuse_elementwise`` gives the attentions a compiled rotary
too, which runs only where that kernel does not.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VLMLP,
    Qwen2_5_VLRMSNorm,
)
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from mosaic_core.memory.transfer import upload
from mosaic_core.model import vision_attention
from mosaic_core.model.geometry import VisionGeometry

MLP_WIDTH_MULTIPLE = 64


def pad_mlp_widths(visual: torch.nn.Module, multiple: int = MLP_WIDTH_MULTIPLE) -> int:
    """Widens every vision block's MLP to a multiple of ``multiple`` units; returns how many were widened."""
    widened = 0
    for block in visual.blocks:
        mlp = block.mlp
        width = mlp.gate_proj.out_features
        extra = -width % multiple
        if extra == 0:
            continue
        mlp.gate_proj = _with_zero_outputs(mlp.gate_proj, extra)
        mlp.up_proj = _with_zero_outputs(mlp.up_proj, extra)
        mlp.down_proj = _with_zero_inputs(mlp.down_proj, extra)
        mlp.intermediate_size = width + extra
        widened += 1
    return widened


@torch.no_grad()
def _with_zero_outputs(linear: torch.nn.Linear, extra: int) -> torch.nn.Linear:
    weight = linear.weight
    grown = torch.nn.Linear(
        linear.in_features,
        linear.out_features + extra,
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    grown.weight.zero_()[: linear.out_features] = weight
    if linear.bias is not None:
        grown.bias.zero_()[: linear.out_features] = linear.bias
    return grown.requires_grad_(weight.requires_grad)


@torch.no_grad()
def _with_zero_inputs(linear: torch.nn.Linear, extra: int) -> torch.nn.Linear:
    weight = linear.weight
    grown = torch.nn.Linear(
        linear.in_features + extra,
        linear.out_features,
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    grown.weight.zero_()[:, : linear.in_features] = weight
    if linear.bias is not None:
        grown.bias.copy_(linear.bias)
    return grown.requires_grad_(weight.requires_grad)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Qwen2_5_VLRMSNorm.forward``'s arithmetic, as a function of its weight."""
    input_dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(input_dtype)


def _silu_mlp(hidden, gate_w, gate_b, up_w, up_b, down_w, down_b) -> torch.Tensor:
    """``Qwen2_5_VLMLP.forward`` with a SiLU gate, as a function of its weights."""
    gate = torch.nn.functional.linear(hidden, gate_w, gate_b)
    up = torch.nn.functional.linear(hidden, up_w, up_b)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_w, down_b)


@functools.cache
def _compiled(function):
    """One compiled version of ``function`` per process, shared by every fused tower (weights are arguments)."""
    return torch.compile(function, dynamic=True)


class FusedRMSNorm(Qwen2_5_VLRMSNorm):
    norm = staticmethod(_rms_norm)  # ``fuse_elementwise`` sets the compiled one on the instance

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states, self.weight, self.variance_epsilon)


class FusedSiluMLP(Qwen2_5_VLMLP):
    mlp = staticmethod(_silu_mlp)  # ``fuse_elementwise`` sets the compiled one on the instance

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        return self.mlp(hidden_state, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias)


def fuse_elementwise(visual: torch.nn.Module, *, compile: bool = True) -> int:
    """Swaps the tower's RMSNorms and SiLU MLPs for the fused ones and, with ``compile``, gives them and the
    tower's batched attentions compiled functions; returns how many norms and MLPs were swapped.

    ``compile`` False keeps the functions eager (the same arithmetic, unfused): what a CPU test can check. The
    attentions' compiled rotary runs only where the Triton rotary does not (a CUDA tensor with triton installed
    always takes the Triton kernel, see ``BatchedChunkAttention._rotated``): a CPU tower fused with ``compile``.
    """
    swapped = 0
    for module in visual.modules():
        if isinstance(module, vision_attention.BatchedChunkAttention):
            if compile:
                module.rotate = _compiled(vision_attention._rotate)
        elif type(module) is Qwen2_5_VLRMSNorm:
            module.__class__ = FusedRMSNorm
            if compile:
                module.norm = _compiled(_rms_norm)
            swapped += 1
        elif type(module) is Qwen2_5_VLMLP and visual.config.hidden_act == "silu":
            module.__class__ = FusedSiluMLP
            if compile:
                module.mlp = _compiled(_silu_mlp)
            swapped += 1
    return swapped


class MatmulPatchEmbed(Qwen2_5_VisionPatchEmbed):
    """``Qwen2_5_VisionPatchEmbed`` as one matrix product: its ``Conv3d`` has kernel == stride, no padding."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The conv weight [embed_dim, C, T, P, P] flattens in the order transformers' view([-1, C, T, P, P]) reads
        # each patch's values, so row i of ``patches`` times the flattened weight is conv output i.
        weight = self.proj.weight
        patch_values = weight.shape[1:].numel()  # C * T * P * P: 1,176 for Qwen2.5-VL
        patches = hidden_states.view(-1, patch_values).to(weight.dtype)  # [num_patches, C * T * P * P]
        return torch.nn.functional.linear(patches, weight.view(self.embed_dim, patch_values), self.proj.bias)


def embed_patches_by_matmul(visual: torch.nn.Module) -> int:
    """Swaps the tower's patch embedding for ``MatmulPatchEmbed``; returns how many were swapped (0 or 1)."""
    swapped = 0
    for module in visual.modules():
        if type(module) is Qwen2_5_VisionPatchEmbed:
            conv = module.proj
            assert conv.kernel_size == conv.stride and conv.padding == (0, 0, 0), f"not a patch conv: {conv}"
            assert conv.dilation == (1, 1, 1) and conv.groups == 1, f"not a patch conv: {conv}"
            module.__class__ = MatmulPatchEmbed
            swapped += 1
    return swapped


class TowerInputs:
    """The vision forward's precomputed inputs per ``(grid, number of frames)`` and CUDA stream, the least recently
    used dropped.

    Kept apart per stream because the caching allocator orders a freed block only after the stream it was made on:
    an entry made on one stream, read by a tower queued on another (``EngineConfig.tower_stream``, or two engines of
    one model) and then dropped could have its memory handed out and written on the first stream while that tower
    still reads it. An entry made on the stream that reads it is freed in that stream's order."""

    def __init__(self, visual: torch.nn.Module, *, capacity: int = vision_attention.MAX_PLANS // 2) -> None:
        self._visual = visual
        self._capacity = capacity
        self._by_key: OrderedDict[tuple[int, int, int, int | None], dict[str, object]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, geometry: VisionGeometry, num_frames: int, device: torch.device | str) -> dict[str, object]:
        """The inputs for a tower queued on ``device``'s current stream."""
        device = torch.device(device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
        key = (geometry.grid_h, geometry.grid_w, num_frames, stream)
        if key in self._by_key:
            self._by_key.move_to_end(key)
            return self._by_key[key]
        inputs = self._compute(geometry, num_frames, device)
        self._by_key[key] = inputs
        while len(self._by_key) > self._capacity:
            self._by_key.popitem(last=False)
        return inputs

    def _compute(self, geometry: VisionGeometry, num_frames: int, device: torch.device) -> dict[str, object]:
        grid_thw = torch.tensor([[1, geometry.grid_h, geometry.grid_w]] * num_frames, dtype=torch.long)
        window_index, cu_window_seqlens, position_ids = self._frames_alike(geometry, num_frames)
        cu_seqlens = get_vision_cu_seqlens(grid_thw)
        # Uploaded without waiting: a plain ``.to(device)`` from pageable memory waits for the stream to drain, the
        # previous ingest call's work included, each time a new batch size comes.
        inputs = {
            name: upload(tensor.numpy(), tensor.dtype, device)
            for name, tensor in (
                ("grid_thw", grid_thw),
                ("position_ids", position_ids),
                ("cu_seqlens", cu_seqlens),
                ("window_index", window_index),
                ("cu_window_seqlens", cu_window_seqlens),
            )
        }
        for name, bounds in (("cu_seqlens", cu_seqlens), ("cu_window_seqlens", cu_window_seqlens)):
            vision_attention.remember_plan(inputs[name], bounds.tolist())  # from the host's copy: no read-back
        inputs["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        inputs["max_window_seqlen"] = int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max())
        return inputs

    def _frames_alike(self, geometry: VisionGeometry, num_frames: int) -> tuple[torch.Tensor, ...]:
        """The window order, window bounds and rotary position ids of ``num_frames`` frames of one grid, as
        transformers' ``get_vision_window_index`` and ``get_vision_position_ids`` give them, from one frame's
        repeated with offsets: those loop over the frames in Python, about 25 ms for 128 frames on a CPU core,
        which a call of a batch size not seen before paid on the engine thread."""
        config = self._visual.config
        one = torch.tensor([[1, geometry.grid_h, geometry.grid_w]], dtype=torch.long)
        window_index, cu_window_seqlens = get_vision_window_index(
            one, spatial_merge_size=config.spatial_merge_size, window_size=config.window_size,
            patch_size=config.patch_size,
        )  # fmt: skip
        frames = torch.arange(num_frames)[:, None]
        merged_tokens, tokens = window_index.numel(), int(cu_window_seqlens[-1])
        bounds = (cu_window_seqlens[1:][None] + frames * tokens).reshape(-1).to(cu_window_seqlens.dtype)
        return (
            (window_index[None] + frames * merged_tokens).reshape(-1),
            torch.cat([cu_window_seqlens[:1], bounds]),
            get_vision_position_ids(one, config.spatial_merge_size).repeat(num_frames, 1),
        )


def run_tower(visual: torch.nn.Module, pixel_values: torch.Tensor, inputs: dict[str, object]) -> torch.Tensor:
    """The tower over one batch of equal-sized frames: ``[num_frames * tokens_per_frame, out_hidden]``."""
    precomputed = dict(inputs)
    grid_thw = precomputed.pop("grid_thw")
    out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw, **precomputed)
    return out.pooler_output
