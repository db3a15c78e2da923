"""VarFormer's networks: VAR's VQVAE and next-scale transformer, the Adapter, the DAE and AFT
modules and the VarFormer model (official names, so the official checkpoints load strictly)."""
from .adapter import Adapter
from .var import VAR, build_var, sample_top_k_top_p
from .varformer import (AdaptiveFeatureTransform, DegradationAwareEnhancement, VarFormer,
                        WeightPredictor)
from .vqvae import VQVAE

__all__ = ["VQVAE", "VAR", "build_var", "sample_top_k_top_p", "VarFormer", "Adapter",
           "WeightPredictor", "DegradationAwareEnhancement", "AdaptiveFeatureTransform"]
