"""varformer: fused kernels for VarFormer. Pure Python at install time; C++/CUDA sources in
csrc/ are compiled on first use. The Triton kernels in kernels/ install as varformer.kernels."""
from setuptools import setup

setup(
    name="varformer",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and a faithful implementation of VarFormer",
    python_requires=">=3.10",
    packages=["varformer", "varformer.ops", "varformer.models", "varformer.data",
              "varformer.train", "varformer.eval", "varformer.analysis", "varformer.kernels", "varformer.benchmarks",
              "varformer.csrc"],
    package_dir={"varformer.kernels": "kernels", "varformer.benchmarks": "benchmarks",
                 "varformer.csrc": "csrc"},
    package_data={"varformer.csrc": ["*.cpp", "*.cu", "*.h", "*.md"]},
    install_requires=["torch>=2.11", "einops", "numpy", "pillow", "pyyaml", "safetensors"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark"],
                    "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["varformer=varformer.cli:main"]},
)
