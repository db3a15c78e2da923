"""Benchmarks of varformer's ops (installed as ``varformer.benchmarks``; CLI: ``varformer bench``)."""
