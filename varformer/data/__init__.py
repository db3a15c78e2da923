"""Data for VarFormer training and evaluation.

- ``pairing``: ``pair_files`` (LQ/GT matched by file name under a rule), ``read_image``;
- ``datasets``: ``PairedDataset``, ``NoisyDataset``, ``CleanDataset``, ``MultiTaskDataset``,
  the task registry ``TASKS`` and ``build_train_dataset`` / ``build_test_datasets`` (config
  format in that module's docstring);
- ``sampler``: ``MultiTaskSampler`` (task weights, distributed ranks, resumable);
- ``check``: ``check`` and ``data_main`` (``varformer data check CONFIG``).

Importing this package needs torch, numpy and pillow (pillow only when images are read);
YAML is imported only when a config file is read.
"""
from .pairing import IMAGE_EXTENSIONS, RULES, list_images, pair_files, read_image
from .datasets import (PAPER_WEIGHTS, TASKS, CleanDataset, MultiTaskDataset, NoisyDataset,
                       PairedDataset, build_test_datasets, build_train_dataset, load_data_config)
from .sampler import MultiTaskSampler
from .check import CheckReport, check, data_main

__all__ = ["IMAGE_EXTENSIONS", "RULES", "list_images", "pair_files", "read_image",
           "PAPER_WEIGHTS", "TASKS", "CleanDataset", "MultiTaskDataset", "NoisyDataset",
           "PairedDataset", "build_test_datasets", "build_train_dataset", "load_data_config",
           "MultiTaskSampler", "CheckReport", "check", "data_main"]
