"""Restoration datasets, the task registry and the builders used by training and evaluation.

Items
-----
Every dataset returns dicts with the same keys, so that batches mixing tasks collate:

    {"lq": float32 [3, H, W] in [-1, 1], "gt": same shape, "task": str,
     "lq_path": str, "gt_path": str, "sigma": float (Gaussian noise level /255, else 0.0)}

Training items are ``crop`` x ``crop`` (images smaller than the crop are reflect-padded, or
replicate-padded where reflection is impossible; LQ and GT are padded, cropped, flipped and
rotated identically). Test items are full images. Normalisation is (x - 0.5) / 0.5 as in the
official code (spec §4.6).

Randomness: an index may be an ``int`` (crop, flips and training noise use torch's global RNG,
which ``DataLoader`` seeds per worker) or a pair ``(index, draw_seed)`` as yielded by
``MultiTaskSampler(..., item_seeds=True)``: then every random choice comes from
``draw_seed`` and the dataset ``seed``, so a run is reproducible for any number of workers and
across resumes. Test noise (``NoisyDataset``, phase "test") is seeded per image file and sigma.

Config (``data_cfg``, e.g. the ``data:`` section of a YAML file)
-----------------------------------------------------------------

    root: /path/to/datasets        # relative layout paths are joined to it
    crop: 256                      # training crop (null: full images)
    augment: true                  # random flips and 90-degree rotations (training)
    seed: 0                        # dataset seed (draw seeds and test noise)
    tasks:                         # training tasks; a list of names takes registry defaults
      dehaze: {}                   # registry layout, paper weight 0.3, rule "reside"
      derain: {weight: 0.2, lq: Rain13K/input, gt: Rain13K/target}
      denoise: {sigma: [15, 25, 50]}
      my_task: {kind: paired, weight: 0.1, lq: a/lq, gt: a/gt, rule: same}
    test:                          # optional; default: registry test sets of the tasks above
      Rain100L: {}                 # registry layout
      SOTS-outdoor: {lq: SOTS/outdoor/hazy, gt: SOTS/outdoor/gt}
      my_set: {task: derain, lq: x/input, gt: x/target}

Per-task / per-test-set keys: ``kind`` ("paired", "noisy" or "clean"), ``lq``, ``gt``,
``rule`` (see ``varformer.data.pairing``), ``weight`` (training only), ``sigma`` (noisy: one
value or a list), ``strict`` (GT files without LQ partner are an error; default true),
``clip`` (noisy: clamp the noisy image to [0, 1]; default true), ``limit`` (use only the first
N pairs, sorted by name), ``match_subdirs`` (default true: LQ ``a/x.png`` pairs with GT
``a/x.png``; false: the GT name is looked up anywhere under the GT folder), and for test sets
``task``. ``test`` may also be a list of test-set
or task names. Unknown per-task keys are errors; unknown top-level keys (loader settings) are
ignored.

The registry (``TASKS``) uses the folder names of the official options (spec §4.5) under
``root``. Layouts not named there (the extra test sets of the paper, SIDD val, SOTS, UDC) follow
the same pattern and are guesses to be overridden from the config where a copy differs.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .pairing import list_images, pair_files, read_image, stable_seed

PHASES = ("train", "test")

# ---------------------------------------------------------------------------------------------
# Task registry. weight = the paper's per-batch task proportion (Sec. 4.1); 0 = test-only task.

def _pair(base: str, lq: str = "input", gt: str = "target", **kw) -> dict:
    return {"lq": f"{base}/{lq}", "gt": f"{base}/{gt}", **kw}


TASKS: dict[str, dict] = {
    "dehaze": {
        "kind": "paired", "weight": 0.3, "rule": "reside",
        "train": {"lq": "dehaze/RESIDE2/OTS_ALPHA2/haze/OTS",
                  "gt": "dehaze/RESIDE2/OTS_ALPHA2/clear/clear_images"},
        "test": {"SOTS-outdoor": _pair("dehaze/SOTS/outdoor", "hazy", "gt")},
    },
    "lowlight": {
        "kind": "paired", "weight": 0.1,
        "train": _pair("llight/LOLdataset/our485", "low", "high"),
        "test": {"LOL-eval15": _pair("llight/LOLdataset/eval15", "low", "high")},
    },
    "derain": {
        "kind": "paired", "weight": 0.2,
        "train": _pair("derain/rain13k/train"),
        "test": {n: _pair(f"derain/test/{n}")
                 for n in ("Rain100L", "Rain100H", "Test100", "Test1200", "Test2800")},
    },
    "denoise": {   # Gaussian; noise is made on the fly (the official LQ folder g_noise is unused)
        "kind": "noisy", "weight": 0.2, "sigma": [15, 25, 50],
        "train": {"gt": "denoise/WED_BSD400/gt"},
        "test": {n: {"gt": f"denoise/{n}"} for n in ("BSD68", "Urban100", "Kodak24")},
    },
    "real_denoise": {
        "kind": "paired", "weight": 0.1,
        "train": _pair("denoise/SIDD/train"),
        "test": {"SIDD": _pair("denoise/SIDD/val")},
    },
    "deblur": {
        "kind": "paired", "weight": 0.1,
        "train": _pair("GoPro/train", "input", "groundtruth"),
        "test": {"GoPro": _pair("GoPro/test", "input", "groundtruth")},
    },
    "clean": {     # stage 1: reconstruction pre-training on clean DF2K, LQ = GT
        "kind": "clean", "weight": 1.0,
        "train": {"gt": "DF2K/HR"},
        "test": {},
    },
    "udc": {       # zero-shot under-display camera: test only
        "kind": "paired", "weight": 0.0,
        "train": None,
        "test": {n: _pair(f"udc/{n}", "LQ", "HQ") for n in ("TOLED", "POLED")},
    },
}

PAPER_WEIGHTS = {t: s["weight"] for t, s in TASKS.items() if t not in ("clean", "udc")}

_KEYS = {"kind", "lq", "gt", "rule", "weight", "sigma", "strict", "clip", "limit", "task",
         "match_subdirs"}


# ---------------------------------------------------------------------------------------------
# Tensor helpers

def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def pad_to(img: torch.Tensor, size: int) -> torch.Tensor:
    """Pad [C, H, W] at the bottom/right to at least size x size: reflect, or replicate where
    the padding is not smaller than the image side (reflection impossible)."""
    _, h, w = img.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return img
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(img, (0, pw, 0, ph), mode=mode)


def _randint(n: int, g: Optional[torch.Generator]) -> int:
    return int(torch.randint(n, (1,), generator=g).item())


def random_views(imgs: Sequence[torch.Tensor], crop: Optional[int], augment: bool,
                 g: Optional[torch.Generator]) -> list[torch.Tensor]:
    """Pad, crop at one random location, and apply one random flip/rotation, identically to
    every [C, H, W] tensor in ``imgs`` (all of the same size)."""
    if crop:
        imgs = [pad_to(x, crop) for x in imgs]
        _, h, w = imgs[0].shape
        top, left = _randint(h - crop + 1, g), _randint(w - crop + 1, g)
        imgs = [x[:, top:top + crop, left:left + crop] for x in imgs]
    if augment:
        mode = _randint(8, g)           # the 8 symmetries of the square
        if mode >= 4:
            imgs = [x.flip(-1) for x in imgs]
        imgs = [torch.rot90(x, mode % 4, dims=(-2, -1)) for x in imgs]
    return [x.contiguous() for x in imgs]


# ---------------------------------------------------------------------------------------------
# Datasets

class _ImageDataset(Dataset):
    def __init__(self, task: str, crop: Optional[int], augment: bool, phase: str, seed: int):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.task, self.crop, self.augment, self.phase, self.seed = task, crop, augment, phase, seed

    def _key(self, key) -> tuple[int, Optional[torch.Generator]]:
        """index, and the generator for this draw (None: torch's global RNG)."""
        if isinstance(key, (tuple, list)):
            index, draw_seed = key
            return int(index), torch.Generator().manual_seed(stable_seed(self.seed, draw_seed))
        return int(key), None

    def _views(self, imgs, g):
        if self.phase == "test":
            return list(imgs)
        return random_views(imgs, self.crop, self.augment, g)

    def _item(self, lq, gt, lq_path, gt_path, sigma=0.0) -> dict:
        return {"lq": normalize(lq), "gt": normalize(gt), "task": self.task,
                "lq_path": str(lq_path), "gt_path": str(gt_path), "sigma": float(sigma)}


class PairedDataset(_ImageDataset):
    """LQ/GT image pairs matched by file name (``rule``, see ``pairing``).

    Items: dict with "lq"/"gt" [3, crop, crop] (train) or [3, H, W] (test) in [-1, 1].
    """

    def __init__(self, lq_dir, gt_dir, rule="same", crop: Optional[int] = 256,
                 augment: bool = True, task: str = "derain", phase: str = "train", seed: int = 0,
                 strict: bool = True, limit: Optional[int] = None, match_subdirs: bool = True):
        super().__init__(task, crop, augment, phase, seed)
        self.lq_dir, self.gt_dir = Path(lq_dir), Path(gt_dir)
        self.pairs = pair_files(lq_dir, gt_dir, rule, strict=strict,
                                match_subdirs=match_subdirs)[:limit]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        index, g = self._key(key)
        lq_path, gt_path = self.pairs[index]
        lq, gt = read_image(lq_path), read_image(gt_path)
        if lq.shape != gt.shape:
            raise ValueError(f"LQ/GT size mismatch: {lq_path} is {tuple(lq.shape[1:])}, "
                             f"{gt_path} is {tuple(gt.shape[1:])}")
        lq, gt = self._views([lq, gt], g)
        return self._item(lq, gt, lq_path, gt_path)


class NoisyDataset(_ImageDataset):
    """Gaussian denoising: lq = gt + N(0, (sigma/255)^2), made on the fly (clamped to [0, 1]
    if ``clip``). Training draws sigma uniformly from ``sigma``; the test phase enumerates
    (sigma, image) pairs (index = sigma_index * n_images + image_index) with noise seeded by
    (seed, image path relative to ``gt_dir``, sigma), identical in every run and worker.
    Items carry "sigma" (in /255 units)."""

    def __init__(self, gt_dir, sigma: Union[float, Sequence[float]] = (15, 25, 50),
                 crop: Optional[int] = 256, phase: str = "train", seed: int = 0, *,
                 augment: bool = True, task: str = "denoise", clip: bool = True,
                 limit: Optional[int] = None):
        super().__init__(task, crop, augment, phase, seed)
        self.gt_dir = Path(gt_dir)
        self.sigmas = [float(s) for s in (sigma if isinstance(sigma, (list, tuple)) else [sigma])]
        if not self.sigmas:
            raise ValueError("NoisyDataset needs at least one sigma")
        self.clip = clip
        self.files = list_images(gt_dir)[:limit]

    def __len__(self) -> int:
        return len(self.files) * (len(self.sigmas) if self.phase == "test" else 1)

    def __getitem__(self, key) -> dict:
        index, g = self._key(key)
        if self.phase == "test":
            sigma = self.sigmas[index // len(self.files)]
            path = self.files[index % len(self.files)]
            rel = path.relative_to(self.gt_dir).as_posix()
            g = torch.Generator().manual_seed(stable_seed("noise", self.seed, rel, sigma))
        else:
            path = self.files[index]
            sigma = self.sigmas[_randint(len(self.sigmas), g)]
        (gt,) = self._views([read_image(path)], g)
        lq = gt + torch.randn(gt.shape, generator=g) * (sigma / 255.0)
        if self.clip:
            lq = lq.clamp(0.0, 1.0)
        return self._item(lq, gt, path, path, sigma)


class CleanDataset(_ImageDataset):
    """Stage-1 reconstruction data (DF2K): lq = gt, clean crops."""

    def __init__(self, gt_dir, crop: Optional[int] = 256, phase: str = "train", seed: int = 0,
                 *, augment: bool = True, task: str = "clean", limit: Optional[int] = None):
        super().__init__(task, crop, augment, phase, seed)
        self.gt_dir = Path(gt_dir)
        self.files = list_images(gt_dir)[:limit]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> dict:
        index, g = self._key(key)
        path = self.files[index]
        (gt,) = self._views([read_image(path)], g)
        return self._item(gt.clone(), gt, path, path)


class MultiTaskDataset(Dataset):
    """Concatenation of per-task datasets. ``task_ranges[task] = (start, stop)`` global indices;
    ``weights[task]`` the sampling weights (normalised). Keys: int or (int, draw_seed)."""

    def __init__(self, datasets: dict, weights: Optional[dict] = None):
        if not datasets:
            raise ValueError("MultiTaskDataset needs at least one task")
        self.datasets = dict(datasets)
        self.task_ranges, start = {}, 0
        for task, ds in self.datasets.items():
            self.task_ranges[task] = (start, start + len(ds))
            start += len(ds)
        self._len = start
        w = weights or {t: 1.0 for t in self.datasets}
        total = sum(w[t] for t in self.datasets)
        self.weights = {t: w[t] / total for t in self.datasets}

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[str, int]:
        """global index -> (task, index within the task)."""
        for task, (a, b) in self.task_ranges.items():
            if a <= index < b:
                return task, index - a
        raise IndexError(f"index {index} out of range for {self._len} items")

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            task, i = self.locate(int(key[0]))
            return self.datasets[task][(i, key[1])]
        task, i = self.locate(int(key))
        return self.datasets[task][i]


# ---------------------------------------------------------------------------------------------
# Config -> layouts -> datasets

def load_data_config(cfg) -> dict:
    """A data config from a dict or a YAML path; a top-level ``data:`` section is unwrapped."""
    if isinstance(cfg, (str, Path)):
        import yaml
        with open(cfg) as f:
            cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise TypeError(f"data config must be a mapping, got {type(cfg).__name__}")
    if "data" in cfg and isinstance(cfg["data"], dict) and "tasks" not in cfg:
        cfg = cfg["data"]
    return cfg


def _path(root, p) -> Optional[Path]:
    if p is None:
        return None
    p = Path(p).expanduser()
    if p.is_absolute():
        return p
    if root is None:
        raise ValueError(f"relative data path {p} but the data config has no 'root'")
    return Path(root).expanduser() / p


def _check_keys(where: str, spec: dict):
    bad = set(spec) - _KEYS
    if bad:
        raise ValueError(f"{where}: unknown key(s) {sorted(bad)}; allowed: {sorted(_KEYS)}")


def _as_mapping(x, what: str) -> dict:
    if x is None:
        return {}
    if isinstance(x, (list, tuple)):
        return {name: {} for name in x}
    if isinstance(x, dict):
        return {k: (v or {}) for k, v in x.items()}
    raise TypeError(f"data config '{what}' must be a mapping or a list, got {type(x).__name__}")


def resolve_train_layouts(data_cfg: dict) -> list[dict]:
    """Resolved training layouts: one dict per task with keys task, name, kind, lq, gt (Paths or
    None), rule, weight, sigma, strict, clip, limit."""
    data_cfg = load_data_config(data_cfg)
    root, out = data_cfg.get("root"), []
    tasks = _as_mapping(data_cfg.get("tasks"), "tasks")
    if not tasks:
        raise ValueError("data config has no training 'tasks'")
    for task, over in tasks.items():
        _check_keys(f"data.tasks.{task}", over)
        reg = TASKS.get(task, {})
        if not reg and "kind" not in over:
            raise ValueError(f"unknown task {task!r} (registry: {', '.join(TASKS)}); "
                             "give its 'kind', 'gt' (and 'lq') and 'weight'")
        spec = {"kind": reg.get("kind"), "rule": reg.get("rule", "same"),
                "weight": reg.get("weight"), "sigma": reg.get("sigma"), "strict": True,
                "clip": True, "limit": None, "lq": None, "gt": None, "match_subdirs": True}
        spec.update(copy.deepcopy(reg.get("train") or {}))
        spec.update(over)
        if spec["weight"] is None:
            raise ValueError(f"data.tasks.{task}: no 'weight'")
        if spec["gt"] is None or (spec["kind"] == "paired" and spec["lq"] is None):
            raise ValueError(f"data.tasks.{task}: no training layout; give 'lq' and 'gt'")
        spec.update(task=task, name=task, lq=_path(root, spec["lq"]), gt=_path(root, spec["gt"]))
        out.append(spec)
    return out


def _test_registry() -> dict[str, tuple[str, dict]]:
    return {name: (task, layout) for task, reg in TASKS.items()
            for name, layout in reg["test"].items()}


def resolve_test_layouts(data_cfg: dict) -> list[dict]:
    """Resolved test layouts: one dict per test set (keys as ``resolve_train_layouts``;
    name = the test set)."""
    data_cfg = load_data_config(data_cfg)
    root, reg_tests = data_cfg.get("root"), _test_registry()
    sets = data_cfg.get("test")
    if sets is None:   # default: registry test sets of the training tasks
        sets = [n for n, (t, _) in reg_tests.items() if t in _as_mapping(data_cfg.get("tasks"),
                                                                           "tasks")]
    sets = _as_mapping(sets, "test")
    expanded = {}
    for name, over in sets.items():   # a task name stands for all its registry test sets
        if name in TASKS and name not in reg_tests and not over:
            expanded.update({n: {} for n in TASKS[name]["test"]})
        else:
            expanded[name] = over
    out = []
    for name, over in expanded.items():
        _check_keys(f"data.test.{name}", over)
        task, layout = reg_tests.get(name, (over.get("task"), {}))
        task = over.get("task", task)
        if task is None:
            raise ValueError(f"unknown test set {name!r} (registry: {', '.join(reg_tests)}); "
                             "give its 'task', 'lq' and 'gt'")
        reg = TASKS.get(task, {})
        spec = {"kind": reg.get("kind", "paired"), "rule": reg.get("rule", "same"),
                "weight": None, "sigma": reg.get("sigma"), "strict": True, "clip": True,
                "limit": None, "lq": None, "gt": None, "match_subdirs": True}
        spec.update(copy.deepcopy(layout))
        spec.update(over)
        if spec["gt"] is None or (spec["kind"] == "paired" and spec["lq"] is None):
            raise ValueError(f"data.test.{name}: no layout; give 'lq' and 'gt'")
        spec.update(task=task, name=name, lq=_path(root, spec["lq"]), gt=_path(root, spec["gt"]))
        out.append(spec)
    return out


def dataset_from_layout(spec: dict, phase: str, crop: Optional[int] = 256, augment: bool = True,
                        seed: int = 0) -> Dataset:
    """One dataset from a resolved layout (an entry of ``resolve_train_layouts`` or
    ``resolve_test_layouts``)."""
    kind, common = spec["kind"], dict(crop=crop, augment=augment, phase=phase, seed=seed,
                                      task=spec["task"], limit=spec["limit"])
    if kind == "paired":
        return PairedDataset(spec["lq"], spec["gt"], rule=spec["rule"], strict=spec["strict"],
                             match_subdirs=spec["match_subdirs"], **common)
    if kind == "noisy":
        return NoisyDataset(spec["gt"], sigma=spec["sigma"] or (15, 25, 50), clip=spec["clip"],
                            **common)
    if kind == "clean":
        return CleanDataset(spec["gt"], **common)
    raise ValueError(f"task {spec['task']!r}: unknown kind {kind!r} (paired, noisy, clean)")


def build_train_dataset(data_cfg) -> MultiTaskDataset:
    """Training data of all tasks in ``data_cfg['tasks']``; use with ``MultiTaskSampler(ds,
    ds.weights, ...)``. Items are [3, crop, crop]."""
    data_cfg = load_data_config(data_cfg)
    crop, augment = data_cfg.get("crop", 256), data_cfg.get("augment", True)
    seed = data_cfg.get("seed", 0)
    specs = resolve_train_layouts(data_cfg)
    datasets = {s["task"]: dataset_from_layout(s, "train", crop, augment, seed) for s in specs}
    return MultiTaskDataset(datasets, {s["task"]: float(s["weight"]) for s in specs})


def build_test_datasets(data_cfg) -> dict[str, Dataset]:
    """Test sets by name (full images). A noisy set with several sigmas becomes one set per
    sigma, named ``<set>_s<sigma>`` (e.g. ``BSD68_s25``)."""
    data_cfg = load_data_config(data_cfg)
    seed, out = data_cfg.get("seed", 0), {}
    for spec in resolve_test_layouts(data_cfg):
        if spec["kind"] == "noisy":
            sigmas = spec["sigma"] or (15, 25, 50)
            sigmas = sigmas if isinstance(sigmas, (list, tuple)) else [sigmas]
            for s in sigmas:
                name = f"{spec['name']}_s{s:g}" if len(sigmas) > 1 else spec["name"]
                out[name] = dataset_from_layout({**spec, "sigma": s}, "test", seed=seed)
        else:
            out[spec["name"]] = dataset_from_layout(spec, "test", seed=seed)
    return out
