"""Fused ops of varformer, usable on their own: ``import varformer.ops``.

Functions (registered as ``torch.ops.varformer.*``):
    mediator_attention(q, m, k, v, scale=None)
    window_attention(qkv, rpb_table, *, window_size, shift_size, num_heads, scale=None)
    vq_lookup(z, codebook, codebook_sqnorm=None, *, return_codes=False, ...)
    vq_area_lookup(f, size, codebook, codebook_sqnorm=None) — one VAR scale, pooling fused
Modules:
    MediatorAttention — VarFormer's AFT block (official ``AnchorCrossAttnBlock`` weights load)
    WindowAttention, SwinTransformerBlock, ResidualSwinTransformerBlock — Swin / SwinIR /
    VarFormer drop-ins
    MultiScaleQuantizer — VAR's multi-scale residual quantizer (VectorQuantizer2 weights load)
Utilities:
    patch_swin(model) / unpatch_swin(model) — fused attention in existing Swin blocks
    backends() — which implementations are available here, and why not
    use_fused_kernels(enabled) — context manager: fused paths on (default rule) or off
    load_aware() — context manager: a CPU section on the threads other processes leave free
    load_aware_backward(*outputs) — the same for the backward that reaches ``outputs``
    fixed_threads() — context manager: thread counts stay put (bit-reproducible runs)
"""
from ._dispatch import backends, use_fused_kernels
from ._ext import fixed_threads, load_aware, load_aware_backward
from .mediator_attention import (MediatorAttention, mediator_attention,
                                 mediator_attention_official, mediator_attention_reference)
from .swin import (ResidualSwinTransformerBlock, SwinTransformerBlock, WindowAttention,
                   patch_swin, unpatch_swin)
from .quantizer import MultiScaleQuantizer
from .vq import sqnorm as codebook_sqnorm
from .vq import vq_area_lookup, vq_lookup, vq_lookup_eager
from .window_attention import window_attention, window_attention_reference

__all__ = ["backends", "use_fused_kernels", "load_aware", "load_aware_backward",
           "fixed_threads", "mediator_attention", "mediator_attention_reference",
           "mediator_attention_official", "MediatorAttention", "window_attention",
           "window_attention_reference", "WindowAttention", "SwinTransformerBlock",
           "ResidualSwinTransformerBlock", "patch_swin", "unpatch_swin", "vq_lookup",
           "vq_area_lookup", "vq_lookup_eager", "codebook_sqnorm", "MultiScaleQuantizer"]
