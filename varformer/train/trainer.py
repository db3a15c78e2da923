"""The VarFormer trainer: stage 1 (adapter + VAR side, Eq. 7) and stage 2 (restoration, Eq. 8).

One optimizer step = ``accum_steps`` micro-batches of ``batch_size`` per process. The model is
wrapped in ``TrainStep`` (and DistributedDataParallel under torchrun); rank 0 logs, validates and
checkpoints. Resuming restores model, EMA, optimizer, step, data position (epoch and batches
consumed in it), sampler and the RNG states of every rank, so the next steps equal those of an
uninterrupted run."""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .checkpoint import (CheckpointManager, load_safetensors, load_state, model_metadata,
                         rng_state, set_rng_state)
from .config import dump_config, load_config
from .losses import build_loss, gt_targets

# official fix_modules (frozen in both stages) and the stage-1 trainable set (spec §4.2)
FROZEN = ("encoder", "quant_conv", "quantize", "blocks", "decoder", "post_quant_conv")
STAGE1_TRAINABLE = ("cross_attn_blocks", "ft_layers", "word_embed", "class_emb", "pos_start",
                    "pos_1LC", "lvl_embed", "head_nm", "head")


# ---- distributed --------------------------------------------------------------------------------
def setup_distributed(backend: Optional[str] = None):
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) -> (rank, world, device);
    initialises the process group (NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return rank, world, device


def _gather(obj, world: int) -> List:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---- model --------------------------------------------------------------------------------------
def build_model(mcfg: Dict) -> nn.Module:
    """From the config's ``model`` section: a ``factory`` ("module:callable", called with
    ``kwargs``) or VarFormer (``preset`` full | small), then the official VQVAE / VAR weights,
    then ``pretrained`` (stage-1 result), then optionally ``var`` again (official order §4.4)."""
    kw = dict(mcfg.get("kwargs") or {})
    if mcfg.get("factory"):
        mod, fn = mcfg["factory"].split(":")
        return getattr(importlib.import_module(mod), fn)(**kw)
    from varformer.models.varformer import VarFormer, _load_part, _read_state_dict
    if mcfg.get("fused_kernels") is not None:
        kw["use_fused_kernels"] = mcfg["fused_kernels"]
    preset = mcfg.get("preset", "full")
    if preset not in ("full", "small"):
        raise ValueError(f"model.preset must be full or small, got {preset!r}")
    model = (VarFormer.small if preset == "small" else VarFormer)(mode=mcfg["mode"], **kw)
    vae_parts = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
    var_parts = ("word_embed", "class_emb", "lvl_embed", "blocks", "head_nm", "head", "pos_start",
                 "pos_1LC", "lvl_1L", "attn_bias_for_masking")
    if mcfg.get("vae"):
        _load_part(model, _read_state_dict(mcfg["vae"], "cpu"), vae_parts, mcfg["vae"])
    if mcfg.get("var"):
        _load_part(model, _read_state_dict(mcfg["var"], "cpu"), var_parts, mcfg["var"])
    if mcfg.get("pretrained"):
        load_partial(model, mcfg["pretrained"])
        if mcfg.get("reload_var") and mcfg.get("var"):
            _load_part(model, _read_state_dict(mcfg["var"], "cpu"), var_parts, mcfg["var"])
    if mcfg.get("checkpointing"):
        model.set_checkpointing(tuple(mcfg["checkpointing"]))
    return model


def load_partial(model: nn.Module, path: str) -> int:
    """Load every tensor of ``path`` (safetensors, or a BasicSR / bare torch file) whose key and
    shape match (stage 1 -> stage 2: stage 2 may keep fewer cross-attention blocks). Returns the
    number of tensors loaded."""
    if path.endswith(".safetensors"):
        sd = load_safetensors(path)
    else:
        from varformer.models.varformer import _read_state_dict
        sd = _read_state_dict(path, "cpu")
    own = model.state_dict()
    take = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise KeyError(f"load_partial: no tensor of {path} matches the model")
    model.load_state_dict(take, strict=False)
    return len(take)


def set_trainable(model: nn.Module, stage: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """requires_grad by top-level module name: ``names``, else stage 1: ``STAGE1_TRAINABLE``,
    stage 2: everything but ``FROZEN``. Returns the trainable top-level names."""
    tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
    if names is None:
        names = ([t for t in tops if t in STAGE1_TRAINABLE] if stage == 1
                 else [t for t in tops if t not in FROZEN])
    unknown = [n for n in names if n not in tops]
    if unknown:
        raise ValueError(f"trainable: {unknown} are not top-level parts of the model ({tops})")
    for n, p in model.named_parameters():
        p.requires_grad_(n.split(".")[0] in names)
    return [t for t in tops if t in names]


def _check_stage1_has_gradient(model: nn.Module, stage: int) -> None:
    """With the stage-1 trainable set, paper mode trains only through the adapter's
    straight-through latent (the VAR branch runs without gradient unless ``var_grad``): without
    the adapter nothing would train."""
    ablation = getattr(model, "ablation", None)
    if (stage == 1 and isinstance(ablation, dict) and not ablation.get("adapter", True)
            and not getattr(model, "var_grad", True)):
        raise ValueError(
            "train: stage 1 with model.ablation.adapter=false has nothing to train in this mode: "
            "the VAR branch runs without gradient (var_grad false, the paper mode's default), "
            "so only the adapter's latent reaches the stage-1 loss. Set "
            "model.kwargs.var_grad=true (train the cross-attention, embeddings and head on the "
            "CE term) or train the ablation in stage 2 only")


class TrainStep(nn.Module):
    """forward(lq [B, 3, 256, 256]) -> (out [B, 3, 256, 256] or None, lq_feat [B, 32, 16, 16],
    logits [B, 680, V]). Without ``image`` (stage 1 without image losses) only the prior path
    runs (VQ encoder, adapter, VAR branch) — the official stage-1 network has no U-Net."""

    def __init__(self, model: nn.Module, image: bool):
        super().__init__()
        self.model, self.image = model, image

    def forward(self, lq: Tensor):
        m = self.model
        if self.image or not hasattr(m, "var_branch"):
            out, lq_feat, logits = m(lq, return_all=True)
            return (out if self.image else None), lq_feat, logits
        from varformer.ops import _dispatch
        m._check_lq(lq)
        fused = getattr(m, "use_fused_kernels", None)
        ctx = contextlib.nullcontext() if fused is None else _dispatch.use_fused_kernels(fused)
        with ctx:
            f_a = m.ft_layers(m.quant_conv(m.encoder(lq)))
            with torch.set_grad_enabled(m.var_grad and torch.is_grad_enabled()):
                _, _, logits, lq_feat = m.var_branch(f_a)
            if not m.var_grad:
                lq_feat = f_a + (lq_feat - f_a).detach()
        return None, lq_feat, logits


class EMA:
    """Exponential moving average of the trainable parameters (official: named_parameters,
    buffers not averaged): ema = d·ema + (1 − d)·param after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    def state_dict(self, model: nn.Module) -> Dict[str, Tensor]:
        """The model's full state dict with the averaged parameters in place."""
        sd = dict(model.state_dict())
        sd.update(self.shadow)
        return sd

    def load_state_dict(self, sd: Dict[str, Tensor]) -> None:
        for n, t in self.shadow.items():
            t.copy_(sd[n])


def lr_at(step: int, ocfg: Dict, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): cosine from lr to eta_min over
    ``total`` steps (paper), multistep (official: ×gamma at each milestone) or constant."""
    lr, kind = float(ocfg["lr"]), ocfg["schedule"]
    if kind == "cosine":
        t = min(step, total) / max(total, 1)
        return ocfg["eta_min"] + (lr - ocfg["eta_min"]) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "multistep":
        return lr * ocfg["gamma"] ** sum(step >= m for m in ocfg["milestones"])
    if kind == "constant":
        return lr
    raise ValueError(f"optim.schedule must be cosine, multistep or constant, got {kind!r}")


# ---- data ---------------------------------------------------------------------------------------
def build_data(dcfg: Dict, world: int, rank: int, seed: int):
    """Training data -> (dataset, sampler). ``{synthetic: {n, size}}`` -> ``SyntheticPairs`` and
    ``ShardedSampler``; otherwise ``varformer.data.build_train_dataset(dcfg)`` and its
    ``MultiTaskSampler`` (task weights of the dataset, per-draw seeds so that crops and noise
    are reproducible across resumes; ``num_samples`` from ``dcfg`` if given)."""
    if "synthetic" in dcfg:
        from .synthetic import ShardedSampler, SyntheticPairs
        s = dict(dcfg["synthetic"] or {})
        ds = SyntheticPairs(n=s.get("n", 16), size=s.get("size", 256), seed=s.get("seed", seed))
        return ds, ShardedSampler(len(ds), world, rank, seed)
    import varformer.data as vdata
    ds = vdata.build_train_dataset(dcfg)
    return ds, vdata.MultiTaskSampler(ds, ds.weights, num_samples=dcfg.get("num_samples"),
                                      seed=seed, num_replicas=world, rank=rank, item_seeds=True)


def build_val_data(vcfg: Dict, seed: int) -> List[Dict]:
    """Validation items (at most ``limit``, default 8): ``{synthetic: {...}}`` or the first test
    set of ``varformer.data.build_test_datasets(vcfg)``, resized to 256² (official val)."""
    limit = int(vcfg.get("limit", 8))
    if "synthetic" in vcfg:
        from .synthetic import SyntheticPairs
        s = dict(vcfg["synthetic"] or {})
        ds = SyntheticPairs(n=s.get("n", 2), size=256, seed=s.get("seed", seed + 1))
    else:
        import varformer.data as vdata
        sets = vdata.build_test_datasets({k: v for k, v in vcfg.items() if k != "limit"})
        ds = next(iter(sets.values()))
    items = []
    for i in range(min(limit, len(ds))):
        it = ds[i]
        lq, gt = (F.interpolate(it[k][None].float(), size=(256, 256), mode="bilinear",
                                align_corners=False)[0] if it[k].shape[-2:] != (256, 256)
                  else it[k] for k in ("lq", "gt"))
        items.append({"lq": lq, "gt": gt})
    return items


# ---- logging ------------------------------------------------------------------------------------
class MetricLog:
    """Scalars to ``metrics.csv`` (step, name, value) and to TensorBoard when it imports."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "metrics.csv")
        new = not os.path.exists(self.path)
        self.file = open(self.path, "a", newline="")
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(["step", "name", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(folder, "tb"))
        except Exception:        # tensorboard not installed
            self.tb = None

    def truncate_after(self, step: int) -> int:
        """Drop the rows of steps after ``step`` (a resumed run writes them again); returns
        the number of rows dropped."""
        self.file.close()
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        keep = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        dropped = len(rows) - 1 - len(keep)
        if dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([rows[0] if rows else ["step", "name", "value"]] + keep)
            os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")
        self.csv = csv.writer(self.file)
        return dropped

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        for k, v in values.items():
            self.csv.writerow([step, k, f"{float(v):.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(k, float(v), step)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---- the trainer --------------------------------------------------------------------------------
class Trainer:
    """Trainer(cfg (from ``load_config``), out_dir, resume=False, val_fn=None).

    ``train(until=None)`` runs to ``train.total_steps`` (``until``: stop after that step without
    a final checkpoint, as a killed run would) and returns the per-step records
    ``{"step", "loss", "lr", <terms>}`` of this process. ``val_fn(model, step) -> {name: value}``
    is called at validation time on rank 0 in addition to the built-in PSNR / sample images."""

    def __init__(self, cfg: Dict, out_dir: str, resume: bool = False,
                 val_fn: Optional[Callable] = None):
        self.cfg, self.out_dir, self.val_fn = cfg, out_dir, val_fn
        tc = cfg["train"]
        self.rank, self.world, self.device = setup_distributed(cfg["dist"].get("backend"))
        self.main = self.rank == 0
        seed = int(cfg["seed"])
        torch.manual_seed(seed)                     # identical initial weights on every rank
        self.model = build_model(cfg["model"]).to(self.device)
        self.trainable = set_trainable(self.model, cfg["stage"], cfg["model"].get("trainable"))
        if cfg["model"].get("trainable") is None:     # the stage's own set
            _check_stage1_has_gradient(self.model, cfg["stage"])
        self.loss_fn = build_loss(cfg["loss"]).to(self.device)
        self.image = cfg["stage"] == 2 or self.loss_fn.needs_image
        self.step_module: nn.Module = TrainStep(self.model, self.image)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DDP(self.step_module, device_ids=ids,
                                   find_unused_parameters=cfg["dist"]["find_unused_parameters"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        oc = cfg["optim"]
        self.opt = torch.optim.Adam(params, lr=float(oc["lr"]), betas=tuple(oc["betas"]),
                                    weight_decay=float(oc["weight_decay"]))
        self.ema = EMA(self.model, float(tc["ema_decay"]))
        self.dataset, self.sampler = build_data(cfg["data"], self.world, self.rank, seed)
        self.ckpt = CheckpointManager(os.path.join(out_dir, "checkpoints"), int(tc["keep_last"]),
                                      int(tc["keep_every"]))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.saved_step: Optional[int] = None      # step of the last checkpoint written/loaded
        self.sampler_epoch: Optional[int] = None   # epoch the sampler is set to
        self._safe_point: Optional[Dict] = None    # state after the last finished step
        self.last_record: Dict[str, float] = {}
        self.last_val: Dict[str, float] = {}
        random.seed(seed + self.rank)
        np.random.seed((seed + self.rank) % 2 ** 32)
        torch.manual_seed(seed + self.rank)
        if self.main:
            os.makedirs(out_dir, exist_ok=True)
            dump_config(cfg, os.path.join(out_dir, "config.yml"))
        self.log = MetricLog(out_dir) if self.main else None
        if resume:
            self.resume()
        self.amp = (self.device.type == "cuda" and tc["amp"] == "bf16")
        self._val_items: Optional[List[Dict]] = None

    # ---- state ------------------------------------------------------------------------------
    def save(self, point: Optional[Dict] = None, alone: bool = False) -> None:
        """Checkpoint (collective under DDP: every rank contributes its RNG / sampler state,
        rank 0 writes). ``point``: the data position and RNG state to record instead of the
        live ones (``_safe_point``, used after Ctrl-C in the middle of a step). ``alone``: rank
        0 writes without the other ranks (after Ctrl-C under DDP, when they may be stopped):
        the weights, optimizer and data position are the same on every rank after a step;
        the other ranks' RNG states are left out (``rng`` None: their streams restart)."""
        epoch, batch_in_epoch = ((point["epoch"], point["batch_in_epoch"]) if point
                                 else (self.epoch, self.batch_in_epoch))
        rng = point["rng"] if point else rng_state()
        consumed = batch_in_epoch * int(self.cfg["train"]["batch_size"])
        if point and self.sampler_epoch != epoch:
            self.sampler.set_epoch(epoch)
        mine = {"rng": rng, "sampler": self.sampler.state_dict(consumed=consumed)}
        per_rank = ([mine] + [dict(mine, rng=None) for _ in range(self.world - 1)] if alone
                    else _gather(mine, self.world))
        if self.main:
            optim = (self.opt.state_dict() if self.cfg["train"].get("save_optimizer", True)
                     else None)
            state = {"optimizer": optim,
                     "scheduler": {"schedule": self.cfg["optim"]["schedule"], "step": self.step},
                     "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                     "per_rank": per_rank, "world_size": self.world, "config": self.cfg}
            self.ckpt.save(self.step, self.model.state_dict(), self.ema.state_dict(self.model),
                           state, metadata=model_metadata(self.cfg, self.step))
        if self.world > 1 and not alone:
            dist.barrier()
        self.saved_step = self.step

    def resume(self) -> bool:
        """Load the ``latest`` checkpoint of ``out_dir`` if there is one."""
        info = self.ckpt.latest()
        if info is None:
            if self.main:
                print(f"varformer train: no checkpoint in {self.ckpt.folder}; starting fresh")
            return False
        self.model.load_state_dict(load_safetensors(info["model"]))
        self.ema.load_state_dict(load_safetensors(info["ema"]))
        st = load_state(info["state"])
        if st.get("optimizer") is not None:
            self.opt.load_state_dict(st["optimizer"])
        elif self.main:
            print("varformer train: the checkpoint has no optimizer state "
                  "(train.save_optimizer: false); Adam restarts its moments")
        self.step, self.epoch, self.batch_in_epoch = (st["step"], st["epoch"],
                                                      st["batch_in_epoch"])
        self.saved_step = self.step
        if self.log is not None:
            self.log.truncate_after(self.step)
        mine = st["per_rank"][self.rank] if self.rank < len(st["per_rank"]) else None
        if st["world_size"] != self.world and self.main:
            print(f"varformer train: checkpoint from {st['world_size']} processes, resuming "
                  f"with {self.world}: data order and RNG continue approximately")
        if mine is not None:
            self.sampler.load_state_dict(mine["sampler"])
            if mine.get("rng") is not None:
                set_rng_state(mine["rng"])
        if self.main and any(r.get("rng") is None for r in st["per_rank"]):
            print("varformer train: the checkpoint was written at Ctrl-C by rank 0 alone: the "
                  "other ranks' random streams restart (data order and weights are exact)")
        if self.main:
            print(f"varformer train: resumed from step {self.step} ({info['state']})")
        return True

    # ---- loop ------------------------------------------------------------------------------
    def _loader(self, indices: List[int]) -> DataLoader:
        tc = self.cfg["train"]
        g = torch.Generator().manual_seed(int(self.cfg["seed"]) + 7919 * self.epoch + self.rank)
        return DataLoader(self.dataset, batch_size=int(tc["batch_size"]), sampler=indices,
                          num_workers=int(tc["num_workers"]), drop_last=True, generator=g,
                          pin_memory=self.device.type == "cuda")

    def _micro(self, batch: Dict, sync: bool) -> Dict[str, Tensor]:
        lq = batch["lq"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        gt_idx, f_hat_gt = gt_targets(self.model, gt)
        no_sync = (self.step_module.no_sync if self.world > 1 and not sync
                   else contextlib.nullcontext)
        accum = int(self.cfg["train"]["accum_steps"])
        with no_sync():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                out, lq_feat, logits = self.step_module(lq)
                loss, terms = self.loss_fn(out, lq_feat, logits, gt, gt_idx, f_hat_gt)
            if not loss.requires_grad:
                raise RuntimeError(
                    f"train: the stage-{self.cfg['stage']} loss has no gradient: none of the "
                    f"trainable parameters ({', '.join(self.trainable) or 'none'}) reaches the "
                    f"loss terms {sorted(terms)}; check model.trainable, the loss weights and "
                    f"model.ablation")
            (loss / accum).backward()
        return dict(terms, loss=loss.detach())

    def _optimizer_step(self) -> Dict[str, float]:
        oc = self.cfg["optim"]
        lr = lr_at(self.step, oc, int(self.cfg["train"]["total_steps"]))
        for group in self.opt.param_groups:
            group["lr"] = lr
        extra = {"lr": lr}
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if oc["clip_grad_norm"]:
            extra["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params,
                                                                      oc["clip_grad_norm"]))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return extra

    def train(self, until: Optional[int] = None) -> List[Dict[str, float]]:
        """Runs steps up to ``until`` (default: total_steps); returns the per-step records. The
        thread count stays fixed (bit-reproducible, exact ``--resume``) unless
        ``train.load_aware`` is true."""
        from varformer.ops import _ext
        with (contextlib.nullcontext() if self.cfg["train"].get("load_aware")
              else _ext.fixed_threads()):
            return self._train(until)

    def _train(self, until: Optional[int]) -> List[Dict[str, float]]:
        tc = self.cfg["train"]
        total, accum, bs = int(tc["total_steps"]), int(tc["accum_steps"]), int(tc["batch_size"])
        stop = total if until is None else min(until, total)
        records: List[Dict[str, float]] = []
        self.step_module.train()
        t0, s0 = time.time(), self.step
        self._safe_point = {"step": self.step, "epoch": self.epoch,
                            "batch_in_epoch": self.batch_in_epoch, "rng": rng_state()}
        acc: Dict[str, float] = {}
        micro = 0
        while self.step < stop:
            if len(self.sampler) < bs:
                raise ValueError(f"train: {len(self.sampler)} samples per process < batch_size "
                                 f"{bs}")
            self.sampler.set_epoch(self.epoch)
            self.sampler_epoch = self.epoch
            idx = list(iter(self.sampler))      # the rest of the epoch (resume: from position)
            for batch in self._loader(idx[:len(idx) // bs * bs]):
                micro += 1
                terms = self._micro(batch, sync=micro % accum == 0)
                for k, v in terms.items():
                    acc[k] = acc.get(k, 0.0) + float(v) / accum
                self.batch_in_epoch += 1
                if micro % accum:
                    continue
                self._safe_point = None            # parameters, EMA, step change together
                acc.update(self._optimizer_step())
                self.step += 1
                rec = dict(acc, step=self.step)
                records.append(rec)
                self.last_record = rec
                acc = {}
                self._after_step(rec, t0, s0, total)
                self._safe_point = {"step": self.step, "epoch": self.epoch,
                                    "batch_in_epoch": self.batch_in_epoch, "rng": rng_state()}
                if self.step >= stop:
                    break
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if until is None or self.step >= total:
            every = int(tc["ckpt_every"])
            if not (every and self.step % every == 0 and self.step > s0):   # not just saved
                self.save()
            if self.log is not None:
                self.log.close()
        return records

    def save_interrupted(self) -> bool:
        """After Ctrl-C: checkpoint the last finished step if it is not saved yet and the
        interruption did not fall inside an optimizer update or a save. Under DDP rank 0
        writes it alone, with no collective (the other ranks may be stopped already); a
        rank interrupted inside an update has no safe point and writes nothing. Returns
        whether a checkpoint was written."""
        point = self._safe_point
        if (not self.main or point is None or point["step"] != self.step
                or self.step == self.saved_step or self.step == 0):
            return False
        self.save(point, alone=self.world > 1)
        return True

    def _after_step(self, rec: Dict[str, float], t0: float, s0: int, total: int) -> None:
        tc = self.cfg["train"]
        if self.main:
            self.log.scalars(self.step, {f"train/{k}": v for k, v in rec.items() if k != "step"})
            if self.step % int(tc["log_every"]) == 0 or self.step == total:
                rate = (self.step - s0) / max(time.time() - t0, 1e-9)
                speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/it"
                terms = " ".join(f"{k} {rec[k]:.4f}" for k in ("ce", "feat", "l1", "psnr",
                                                                 "percep") if k in rec)
                print(f"[{self.cfg['name']}] step {self.step}/{total} | loss {rec['loss']:.4f} "
                      f"({terms}) | lr {rec['lr']:.2e} | {speed} | ETA "
                      f"{_fmt_time((total - self.step) / max(rate, 1e-9))}", flush=True)
        if int(tc["ckpt_every"]) and self.step % int(tc["ckpt_every"]) == 0:
            self.save()
        if int(tc["val_every"]) and self.step % int(tc["val_every"]) == 0:
            if self.main:
                self.validate()
            if self.world > 1:
                dist.barrier()

    # ---- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Mean RGB PSNR (on [0, 1], full image) of the live model on the ``val`` data; the first
        ``val.samples`` (default 2) results are saved as lq | out | gt PNGs in ``<out>/val``."""
        vc = dict(self.cfg.get("val") or {})
        n_save = int(vc.pop("samples", 2))
        scalars: Dict[str, float] = {}
        if vc:
            if self._val_items is None:
                self._val_items = build_val_data(vc, int(self.cfg["seed"]))
            self.model.eval()
            psnrs = []
            for i, item in enumerate(self._val_items):
                lq, gt = item["lq"][None].to(self.device), item["gt"][None].to(self.device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    out = self.model(lq).float()
                mse = ((out - gt) / 2).pow(2).mean().clamp_min(1e-12)
                psnrs.append(float(-10 * torch.log10(mse)))
                if i < n_save:
                    _save_row(os.path.join(self.out_dir, "val", f"step{self.step:09d}_{i}.png"),
                              (lq[0], out[0], gt[0]))
            self.model.train()
            scalars["val/psnr"] = sum(psnrs) / max(len(psnrs), 1)
            self.last_val = dict(scalars)
        if self.val_fn is not None:
            scalars.update({f"val/{k}": v for k, v in self.val_fn(self.model, self.step).items()})
        if scalars:
            self.log.scalars(self.step, scalars)
            print(f"[{self.cfg['name']}] val step {self.step}: " +
                  " ".join(f"{k} {v:.4f}" for k, v in scalars.items()), flush=True)
        return scalars


def _save_row(path: str, images: Sequence[Tensor]) -> None:
    """[3, H, W] images in [-1, 1] -> one PNG side by side."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    row = torch.cat([((im.float().clamp(-1, 1) + 1) * 127.5).round() for im in images], 2)
    Image.fromarray(row.byte().permute(1, 2, 0).cpu().numpy()).save(path)


# ---- command line -------------------------------------------------------------------------------
def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``varformer train CONFIG [--resume] [--out DIR] [key.sub=value ...]``; under torchrun
    every process runs it. Returns the exit status."""
    p = argparse.ArgumentParser(prog="varformer train", description="Train VarFormer (stage 1 "
                                "or 2 as the config says).")
    p.add_argument("config", help="YAML file, or a name in configs/ (paper_stage1, "
                   "paper_stage2, tiny_cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the output folder")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    p.add_argument("overrides", nargs="*", help="key.sub=value (YAML scalars)")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, KeyError, ValueError) as e:
        print(f"varformer train: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", cfg["name"])
    debug = os.environ.get("VARFORMER_TRACEBACK") == "1"
    trainer = None
    try:
        trainer = Trainer(cfg, out, resume=args.resume)
        trainer.train()
    except KeyboardInterrupt:
        return _interrupted(trainer, args, out)
    except (OSError, KeyError, ValueError, ImportError) as e:   # missing data, bad weights,
        # bad config values, a model.factory that does not import
        if debug:
            raise
        step = f" at step {trainer.step}" if trainer is not None else ""
        print(f"varformer train: {type(e).__name__}{step}: " + " ".join(str(e).split())
              + " (VARFORMER_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.main:
        _closing_line(trainer, out)
    return 0


def _resume_command(args, out: str) -> str:
    parts = ["varformer train", args.config, "--out", out, *args.overrides, "--resume"]
    return " ".join(parts)


def _interrupted(trainer, args, out: str) -> int:
    """Ctrl-C: one line (and a checkpoint of the last finished step where that is safe)."""
    if trainer is None:
        print("varformer train: stopped before the first step (nothing to save)",
              file=sys.stderr)
        return 130
    saved = False
    if trainer.main:
        # torchrun passes the Ctrl-C on to every worker a second time: under DDP that second
        # signal must not abort rank 0's save (its SIGKILL after a grace period still can)
        ignore = trainer.world > 1 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore else None
        try:
            saved = trainer.save_interrupted()
        except KeyboardInterrupt:
            saved = False
        except Exception as e:  # a failed emergency save must not hide the message
            print(f"varformer train: could not save step {trainer.step}: {e}", file=sys.stderr)
        finally:
            if ignore:
                signal.signal(signal.SIGINT, previous)
    last = trainer.saved_step
    if trainer.main:
        what = (f"saved a checkpoint of step {last}" if saved else
                f"last checkpoint step {last}" if last is not None else "no checkpoint yet")
        cont = (f"; continue with: {_resume_command(args, out)}" if last is not None
                else "; start again (nothing to resume)")
        print(f"varformer train: stopped at step {trainer.step}; {what}{cont}", file=sys.stderr)
    if trainer.log is not None:
        trainer.log.close()
    return 130


def _closing_line(trainer, out: str) -> None:
    info = trainer.ckpt.latest()
    rec = trainer.last_record
    metrics = ", ".join([f"loss {rec['loss']:.4f}"] if "loss" in rec else [])
    metrics += "".join(f", {k} {v:.2f}" for k, v in trainer.last_val.items())
    where = (f"checkpoints in {trainer.ckpt.folder} (restore/eval: --weights {info['ema']})"
             if info else "no checkpoint written")
    print(f"varformer train: done at step {trainer.step}; {metrics or 'no steps run'}; {where}; "
          f"metrics in {os.path.join(out, 'metrics.csv')}", flush=True)


__all__ = ["Trainer", "TrainStep", "EMA", "build_model", "set_trainable", "load_partial",
           "lr_at", "build_data", "build_val_data", "setup_distributed", "train_main", "FROZEN",
           "STAGE1_TRAINABLE"]
