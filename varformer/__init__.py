"""varformer: fused kernels for VarFormer (image restoration with VAR priors) and its hot ops."""
__version__ = "0.1.0"
