"""Triton kernels of varformer (installed as ``varformer.kernels``; one file per kernel family).

Importing this package imports triton. Set ``TRITON_INTERPRET=1`` before the first import to run
the kernels on CPU tensors in Triton's interpreter.
"""
