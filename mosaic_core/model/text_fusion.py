"""The language model's element-wise work, compiled for big passes only.

Ingest runs the language model over thousands of frame tokens a pass (128 frames of 128 tokens: 16,384 rows).
transformers' modules run every element-wise op of an RMSNorm (to float32, pow, mean, rsqrt, mul, back to the input
dtype, mul by the weight) and of the MLP's SiLU gate as a kernel of its own over the whole pass: on an H200 about
100 ms of a 680 ms pass. Each attention's rotary embedding is ten kernels more (for query and key each: the mul by
cos, the neg and the cat of ``rotate_half``, the mul by sin, the add), the query's as big as the hidden states.
``fuse_text_elementwise`` swaps each norm, MLP, attention and decoder layer for one that, on a big pass, runs that
work as functions compiled once with ``torch.compile``. The matrix products stay in cuBLAS through the Linear
modules; compiled are the norms, ``silu(gate) * up``, the rotary of query and key, and each layer's residual add
after attention together with the norm that follows it. The add that ends a layer stays eager: the norm after it is
the next layer's, called from transformers' text model between layers.

A small pass (a question's prefill, a decode step) runs the same arithmetic as one Triton kernel per piece on CUDA
(``mosaic_core.kernels.text_elementwise``: the norm, the layer's add after attention with the norm after it,
``silu(gate) * up``, the rotary of query and of key), and eagerly on the CPU: see ``MIN_FUSED_TOKENS``.
``use_small_pass_kernels`` turns the kernels off and on again, for side-by-side runs in one process.
"""

from __future__ import annotations

import math

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLAttention,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLRMSNorm,
    Qwen2MLP,
    eager_attention_forward,
    rotate_half,
)

from mosaic_core.errors import ConfigError
from mosaic_core.kernels import kernels_ready
from mosaic_core.model.vision_tower import _compiled, _rms_norm

# Question prefills and decode steps have far fewer rows than this and replay from CUDA graphs: a compile for each
# new shape would be wasted there, and a (re)compile while a graph is being captured would break the capture, so
# they take the Triton kernels, which have no shapes to compile for. Ingest passes have thousands of rows and run
# eagerly, not from graphs.
MIN_FUSED_TOKENS = 1024


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``Qwen2MLP.forward``'s element-wise part with a SiLU gate."""
    return torch.nn.functional.silu(gate) * up


def _rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb``'s arithmetic on ``[tokens, heads, head_dim]`` query and key, with ``[tokens,
    head_dim]`` cos and sin: per element the same ops in the same dtypes, only the token axes are flattened."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin)


def _add_rms_norm(
    residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's ``residual + update`` and the RMSNorm of the sum: both are needed, the sum as the next
    residual."""
    hidden = residual + update
    return hidden, _rms_norm(hidden, weight, eps)


def _kernel_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_rotary`` as two Triton launches, one for query and one for key."""
    from mosaic_core.kernels.text_elementwise import text_rotary  # imports triton, which a CPU install may lack

    return text_rotary(query, cos, sin), text_rotary(key, cos, sin)


def _kernel_add_rms_norm(
    residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_add_rms_norm`` as one Triton launch."""
    from mosaic_core.kernels.text_elementwise import rms_norm

    return rms_norm(residual, weight, eps, update=update)


def _takes_small_kernels(module: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """Whether ``module``'s small pass over ``hidden`` runs the Triton kernels: they are on for it, and ``hidden``
    is on CUDA, where Triton runs. A CPU pass stays eager even under Triton's CPU interpreter."""
    return module.small_kernels and hidden.is_cuda and kernels_ready()


def _is_big_pass(hidden: torch.Tensor, min_tokens: int) -> bool:
    """Whether ``hidden`` (``[..., hidden]``) has at least ``min_tokens`` rows and is not being captured into a
    CUDA graph."""
    if math.prod(hidden.shape[:-1]) < min_tokens:
        return False
    return not (hidden.is_cuda and torch.cuda.is_current_stream_capturing())


class FusedTextRMSNorm(Qwen2_5_VLRMSNorm):
    norm = staticmethod(_rms_norm)  # ``fuse_text_elementwise`` sets the compiled one on the instance
    min_tokens = MIN_FUSED_TOKENS
    small_kernels = False  # ``fuse_text_elementwise`` and ``use_small_pass_kernels`` set it on the instance

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The compiled function and the kernel see [tokens, hidden] whatever the batch's shape: one dynamic graph
        # serves all, and the kernel one program per row.
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        if _is_big_pass(hidden_states, self.min_tokens):
            return self.norm(rows, self.weight, self.variance_epsilon).reshape(hidden_states.shape)
        if _takes_small_kernels(self, hidden_states):
            from mosaic_core.kernels.text_elementwise import rms_norm

            return rms_norm(rows, self.weight, self.variance_epsilon)[1].reshape(hidden_states.shape)
        return _rms_norm(hidden_states, self.weight, self.variance_epsilon)


class FusedTextMLP(Qwen2MLP):
    silu_mul = staticmethod(_silu_mul)  # ``fuse_text_elementwise`` sets the compiled one on the instance
    min_tokens = MIN_FUSED_TOKENS
    small_kernels = False  # ``fuse_text_elementwise`` and ``use_small_pass_kernels`` set it on the instance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # [..., intermediate]
        if _is_big_pass(x, self.min_tokens):
            silu_mul = self.silu_mul
        elif _takes_small_kernels(self, x):
            from mosaic_core.kernels.text_elementwise import silu_mul
        else:
            return self.down_proj(_silu_mul(gate, up))
        width = gate.shape[-1]
        product = silu_mul(gate.reshape(-1, width), up.reshape(-1, width)).reshape(gate.shape)
        return self.down_proj(product)


class FusedTextAttention(Qwen2_5_VLAttention):
    rotary = staticmethod(_rotary)  # ``fuse_text_elementwise`` sets the compiled one on the instance
    min_tokens = MIN_FUSED_TOKENS
    small_kernels = False  # ``fuse_text_elementwise`` and ``use_small_pass_kernels`` set it on the instance

    def forward(
        self, hidden_states, attention_mask=None, position_ids=None, cache=None, position_embeddings=None, **kwargs
    ):
        if position_embeddings is not None and _is_big_pass(hidden_states, self.min_tokens):
            rotary = self.rotary
        elif position_embeddings is not None and _takes_small_kernels(self, hidden_states):
            rotary = _kernel_rotary
        else:
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        # transformers 5.24's ``Qwen2_5_VLAttention.forward``; only the rotary differs, run over [tokens, heads,
        # head_dim] so that one dynamic graph serves every batch shape. transformers calls its module-level
        # ``apply_rotary_pos_emb`` by name, so that step cannot be swapped for one instance alone.
        bsz, q_len, _ = hidden_states.size()
        rows = bsz * q_len
        query_states = self.q_proj(hidden_states).view(rows, -1, self.head_dim)
        key_states = self.k_proj(hidden_states).view(rows, -1, self.head_dim)
        value_states = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)

        cos, sin = (t.expand(bsz, q_len, -1).reshape(rows, -1) for t in position_embeddings)  # [rows, head_dim]
        query_states, key_states = rotary(query_states, key_states, cos, sin)
        # back to [batch, heads, tokens, head_dim] views, with the strides transformers' rotary gives
        query_states = query_states.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        key_states = key_states.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            position_ids=position_ids,
            **kwargs,
        )
        attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class FusedTextDecoderLayer(Qwen2_5_VLDecoderLayer):
    add_norm = staticmethod(_add_rms_norm)  # ``fuse_text_elementwise`` sets the compiled one on the instance
    min_tokens = MIN_FUSED_TOKENS
    small_kernels = False  # ``fuse_text_elementwise`` and ``use_small_pass_kernels`` set it on the instance

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        layer_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if _is_big_pass(hidden_states, self.min_tokens):
            add_norm = self.add_norm
        elif _takes_small_kernels(self, hidden_states):
            add_norm = _kernel_add_rms_norm
        else:
            return super().forward(hidden_states, **layer_kwargs)
        # transformers 5.24's ``Qwen2_5_VLDecoderLayer.forward``, with ``residual + attention`` and the norm after it
        # as one function over [tokens, hidden].
        attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **layer_kwargs)
        width, norm = hidden_states.shape[-1], self.post_attention_layernorm
        residual, normed = add_norm(
            hidden_states.reshape(-1, width), attention.reshape(-1, width), norm.weight, norm.variance_epsilon
        )
        residual, normed = residual.view(hidden_states.shape), normed.view(hidden_states.shape)
        return residual + self.mlp(normed)


def fuse_text_elementwise(
    language_model: torch.nn.Module,
    *,
    compile: bool = True,
    min_tokens: int = MIN_FUSED_TOKENS,
    small_kernels: bool = True,
) -> int:
    """Swaps the language model's RMSNorms, SiLU MLPs, attentions and decoder layers for ones that run their
    element-wise work (an attention's: the rotary of query and key; a decoder layer's: the residual add after
    attention with the norm after it) as one compiled function on passes of at least ``min_tokens`` tokens, and with
    ``small_kernels`` as Triton kernels on smaller passes on CUDA; returns how many modules were swapped.

    Only ``language_model``'s own modules are walked: the vision tower's norms are the same transformers class and
    are left as they are. ``compile`` False keeps the functions eager (the same arithmetic, unfused): what a CPU test
    can check.
    """
    if min_tokens < 2:
        # torch.compile specialises a dimension of size 1, so a one-row pass would compile a graph of its own.
        raise ConfigError(f"min_tokens must be at least 2, got {min_tokens}")
    silu = language_model.config.hidden_act == "silu"
    swapped = 0
    for module in language_model.modules():
        if type(module) is Qwen2_5_VLRMSNorm:
            module.__class__ = FusedTextRMSNorm
            if compile:
                module.norm = _compiled(_rms_norm)
        elif type(module) is Qwen2MLP and silu:
            module.__class__ = FusedTextMLP
            if compile:
                module.silu_mul = _compiled(_silu_mul)
        elif type(module) is Qwen2_5_VLAttention:
            module.__class__ = FusedTextAttention
            if compile:
                module.rotary = _compiled(_rotary)
        elif type(module) is Qwen2_5_VLDecoderLayer:
            module.__class__ = FusedTextDecoderLayer
            if compile:
                module.add_norm = _compiled(_add_rms_norm)
        else:
            continue
        module.min_tokens = min_tokens
        module.small_kernels = small_kernels
        swapped += 1
    return swapped


def use_small_pass_kernels(language_model: torch.nn.Module, enabled: bool) -> int:
    """Turns the Triton kernels of small passes on or off for every module ``fuse_text_elementwise`` swapped;
    returns how many. CUDA graphs captured before keep what they captured: capture them again (a new engine)."""
    fused = (FusedTextRMSNorm, FusedTextMLP, FusedTextAttention, FusedTextDecoderLayer)
    modules = [m for m in language_model.modules() if isinstance(m, fused)]
    for module in modules:
        module.small_kernels = enabled
    return len(modules)
