"""C++ (CPU, OpenMP) and CUDA C++ sources of varformer, shipped as package data and built on
first use by ``varformer.ops._ext``."""
