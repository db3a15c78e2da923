"""Fused ops of varformer, usable on their own: ``import varformer.ops``.

Functions (registered as ``torch.ops.varformer.*``):
    mediator_attention(q, m, k, v, scale=None)
Modules:
    MediatorAttention — VarFormer's AFT block (official ``AnchorCrossAttnBlock`` weights load)
Utilities:
    backends() — which implementations are available here, and why not
"""
from ._dispatch import backends
from .mediator_attention import (MediatorAttention, mediator_attention,
                                 mediator_attention_official, mediator_attention_reference)

__all__ = ["backends", "mediator_attention", "mediator_attention_reference",
           "mediator_attention_official", "MediatorAttention"]
