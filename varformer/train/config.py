"""Training configs: YAML files merged over ``DEFAULTS``, plus ``key.sub=value`` overrides.

A config names the stage (1: adapter + VAR side, paper Eq. 7; 2: restoration, Eq. 8), the model,
the loss weights, the optimiser and schedule, the training loop, the data and the validation.
``data``, ``val`` and ``model.kwargs`` are free-form (passed on); every other key must exist in
``DEFAULTS``, so a typo is an error."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Sequence

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
FREE_FORM = ("data", "val", "model.kwargs")

DEFAULTS: Dict[str, Any] = {
    "name": "varformer",
    "stage": 1,
    "seed": 114514,
    "model": {
        "factory": None,        # "module:callable" building a stand-in model (tests)
        "preset": "full",       # full | small (VarFormer.small)
        "mode": "official",     # official | paper
        "kwargs": {},           # extra VarFormer arguments (var_depth, n_cross, var_grad, ...)
        "vae": None,            # vae_ch160v4096z32.pth (official VQVAE)
        "var": None,            # var_d16.pth / var_d20.pth (official VAR)
        "pretrained": None,     # stage-1 result for stage 2 (our ema.safetensors or BasicSR file)
        "reload_var": False,    # official quirk (spec §4.4): re-apply `var` after `pretrained`
        "checkpointing": [],    # activation checkpointing of these prior levels, e.g. [1, 2]
        "fused_kernels": None,  # None: the model's dispatch rule; False: PyTorch references
        "trainable": None,      # top-level module names to train; None: the stage's set
        # Table-5 ablation switches (VarFormer(ablation=...)): a letter a..f or these bools;
        # anything switched off is also put into model.kwargs.ablation (checkpoints carry it)
        "ablation": {"skip": True, "adapter": True, "aft": True, "dae": True},
    },
    "loss": {
        "ce": 0.1, "feat": 0.5,                 # stage 1 and 2 (official weights)
        "l1": 0.0, "psnr": 0.0, "percep": 0.0,  # stage 2 sets these (official: 1, 0.5, 1)
        "percep_layer": "relu5_4",
        "percep_criterion": "l1",               # l1 (official code) | l2 (paper Eq. 8)
        "vgg_weights": None,                    # torchvision-format vgg19-dcbb9e9d.pth
    },
    "optim": {
        "lr": 1.0e-4, "betas": [0.9, 0.999], "weight_decay": 0.0,
        "schedule": "cosine",                   # cosine | multistep | constant
        "eta_min": 1.0e-6,                      # cosine floor
        "milestones": [400000, 450000], "gamma": 0.5,   # multistep (official)
        "clip_grad_norm": 0.0,                  # 0 disables
    },
    "train": {
        "total_steps": 500000,
        "batch_size": 4,                        # per process
        "accum_steps": 1,
        "num_workers": 2,
        "ema_decay": 0.998,
        "amp": "bf16",                          # bf16 autocast on CUDA (CPU runs fp32) | none
        "log_every": 100,
        "ckpt_every": 10000,
        "keep_last": 3,                         # retention: the last N checkpoints ...
        "keep_every": 50000,                    # ... plus every M steps (0: none)
        "save_optimizer": True,                 # false: checkpoints without Adam moments
                                                # (smaller; --resume restarts the moments)
        "val_every": 0,                         # 0: no validation
        "load_aware": False,                    # true: on a busy CPU machine fewer threads
                                                # per step (faster; results then depend on
                                                # the load, --resume is no longer bit-exact)
    },
    "data": {},                                 # {synthetic: {n, size}} or varformer.data's
    "val": {},                                  # {synthetic: {...}} or varformer.data's; samples
    "dist": {"find_unused_parameters": True, "backend": None},   # None: nccl on GPU, else gloo
}


def _merge(base: Dict, new: Dict, path: str = "") -> Dict:
    """``new`` merged into a copy of ``base``; keys outside the free-form sections must exist."""
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        key = path + k
        free = key in FREE_FORM or any(path.startswith(f + ".") for f in FREE_FORM)
        if k not in base and not free:
            raise KeyError(f"config: unknown key {key!r}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, key + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_path(name: str) -> str:
    """A config file path, or a bare name (``tiny_cpu``) looked up in the repository's
    ``configs/`` folder."""
    if os.path.isfile(name):
        return name
    for cand in (os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".yml")):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"config {name!r} not found (neither a file nor in {CONFIG_DIR})")


def parse_overrides(items: Sequence[str]) -> Dict:
    """["train.total_steps=2", "loss.ce=0"] -> nested dict; values parsed as YAML scalars."""
    import yaml
    out: Dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key.sub=value")
        key, val = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val) if val != "" else None
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (),
                extra: Optional[Dict] = None) -> Dict:
    """DEFAULTS <- YAML file <- ``extra`` dict <- ``key.sub=value`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        import yaml
        with open(resolve_path(path)) as f:
            cfg = _ablation_dict(_merge(cfg, yaml.safe_load(f) or {}))
    for layer in (extra or {}, parse_overrides(overrides)):
        cfg = _ablation_dict(_merge(cfg, layer))
    if cfg["stage"] not in (1, 2):
        raise ValueError(f"config: stage must be 1 or 2, got {cfg['stage']!r}")
    return _ablation_kwargs(cfg)


_ALL_ON = DEFAULTS["model"]["ablation"]


def _resolve_ablation(value, where: str) -> Dict[str, bool]:
    if value == _ALL_ON:
        return dict(_ALL_ON)
    from varformer.models.varformer import resolve_ablation   # imports torch: only when needed
    try:
        return resolve_ablation(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: {where}: {e}") from None


def _ablation_dict(cfg: Dict) -> Dict:
    """``model.ablation`` given as a Table-5 letter (or partly) -> the full dict of switches,
    so that a later ``model.ablation.<switch>=...`` override merges into it."""
    model = cfg["model"]
    if model.get("ablation") != _ALL_ON:
        model["ablation"] = _resolve_ablation(model.get("ablation"), "model.ablation")
    return cfg


def _ablation_kwargs(cfg: Dict) -> Dict:
    """Switched-off modules go to ``model.kwargs.ablation`` (the VarFormer argument); an
    all-on config keeps the kwargs free of it."""
    model = cfg["model"]
    ab = model["ablation"]
    kw = model.setdefault("kwargs", {}) if model.get("kwargs") is not None else {}
    if "ablation" in kw:
        kab = _resolve_ablation(kw["ablation"], "model.kwargs.ablation")
        if kab != ab and not all(ab.values()):
            raise ValueError(f"config: model.ablation {ab} and model.kwargs.ablation {kab} "
                             f"disagree; set one of them")
        model["ablation"] = ab = kab
    if all(ab.values()):
        kw.pop("ablation", None)
    else:
        kw["ablation"] = dict(ab)
        model["kwargs"] = kw
    return cfg


def dump_config(cfg: Dict, path: str) -> None:
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


__all__: List[str] = ["DEFAULTS", "CONFIG_DIR", "load_config", "parse_overrides", "resolve_path",
                      "dump_config"]
