"""Evaluation: BasicSR-convention PSNR/SSIM (``metrics``), LPIPS AlexNet v0.1 (``lpips``) and the
test-set runner with paper-style tables and ``varformer eval`` (``runner``)."""
from .lpips import LPIPS
from .metrics import psnr, ssim
from .runner import TestSet, eval_main, evaluate, format_tables

__all__ = ["psnr", "ssim", "LPIPS", "TestSet", "evaluate", "format_tables", "eval_main"]
