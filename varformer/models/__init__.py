"""VarFormer's networks: VAR's VQVAE and next-scale transformer (official names, so the
official checkpoints load strictly)."""
from .var import VAR, build_var, sample_top_k_top_p
from .vqvae import VQVAE

__all__ = ["VQVAE", "VAR", "build_var", "sample_top_k_top_p"]
