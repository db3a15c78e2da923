"""VarFormer training: losses (paper Eq. 7 / 8 and the official terms), the two-stage trainer
(EMA, bf16 autocast on CUDA, DDP, accumulation, clipping), crash-safe checkpoints with exact
resume, YAML configs (``configs/``) and ``train_main`` (``varformer train``).

yaml and safetensors are imported inside functions only."""
from .checkpoint import CheckpointManager, atomic_write
from .config import load_config, parse_overrides
from .losses import (PerceptualLoss, VarFormerLoss, VGG19Features, build_loss, ce_loss,
                     feat_loss, gt_targets, psnr_loss)
from .synthetic import ShardedSampler, SyntheticPairs
from .trainer import EMA, Trainer, TrainStep, build_model, lr_at, set_trainable, train_main

__all__ = ["Trainer", "TrainStep", "EMA", "train_main", "load_config", "parse_overrides",
           "build_model", "set_trainable", "lr_at", "CheckpointManager", "atomic_write",
           "VarFormerLoss", "VGG19Features", "PerceptualLoss", "build_loss", "psnr_loss",
           "ce_loss", "feat_loss", "gt_targets", "SyntheticPairs", "ShardedSampler"]
