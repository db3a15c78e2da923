"""varformer: fused kernels for VarFormer (image restoration with VAR priors) and its hot ops.

``varformer.restore(model, image)`` restores an image of any size (tiled; see
``varformer.restoration``); ``varformer.ops`` holds the fused ops, ``varformer.models`` the
networks."""
__version__ = "0.1.0"


def __getattr__(name):
    if name == "restore":      # lazy: importing varformer stays free of torch
        from .restoration import restore
        return restore
    raise AttributeError(f"module 'varformer' has no attribute {name!r}")
