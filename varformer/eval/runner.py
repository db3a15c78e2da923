"""Evaluate a restoration model on test sets: PSNR / SSIM (/ LPIPS) tables like the paper's.

Python API:

- ``evaluate(model, test_sets, protocol=...)`` restores every LQ image with
  ``varformer.restore`` (``protocol="tiled"``: full resolution, overlapping tiles;
  ``"resize"``: the official protocol, bicubic to 256x256 and back), measures it against its GT
  image at the GT's resolution and returns rows (dicts): one per image and one mean per set.
- ``format_tables(rows)`` -> (markdown, csv text): one row per task / test set, per protocol.
- ``eval_main(argv)``: ``varformer eval CONFIG --weights FILE [--protocol tiled|resize|both]
  [--out DIR] [--device cpu|cuda] [--mode official|paper] [--batch-size N]
  [--lpips-backbone FILE --lpips-linear FILE]``; writes ``results.md``, ``results.csv``,
  ``per_image.csv`` and the restored images ``<out>/<protocol>/<task>/<set>/<name>.png``.

Config (YAML)::

    root: datasets            # optional; relative paths below are taken from here. A relative
                              # root is taken from the config file's folder (the default root).
    crop_border: 0            # optional metric settings for every set (BasicSR conventions):
    test_y_channel: false     #   pixels cropped per side; PSNR/SSIM on BT.601 Y instead of RGB
    tile: 256                 # optional restore() settings: tile size and overlap (tiled)
    overlap: 32
    sets:
      - task: deraining       # table row group (Table 1 column)
        name: Rain100L        # test set name
        lq: Rain100L/input    # degraded images
        gt: Rain100L/target   # clean images
        rule: rain100         # optional LQ -> GT name rule of varformer.data.pairing.pair_files:
                              # same (default), reside, rain100, sidd or {pattern: .., repl: ..}
      - task: dehazing
        name: SOTS-outdoor
        lq: SOTS/outdoor/hazy
        gt: SOTS/outdoor/gt
        rule: reside
      - task: gaussian denoising
        name: BSD68
        gt: BSD68             # no lq: noisy inputs are made from gt ...
        sigma: [15, 25, 50]   # ... for each sigma (0-255 scale; a number or a list)
        seed: 0               # optional noise seed, default 0
        crop_border: 0        # optional per-set overrides of the metric settings
        test_y_channel: false

Gaussian-noise inputs come from ``varformer.data.datasets.NoisyDataset`` in its test phase
(the same noise as the training-time validation): ``gt + sigma/255 * N(0, 1)`` in float32, drawn
from a generator seeded by (seed, image path relative to gt, sigma), so an image gets the same
noise in every run whatever the order or subset; clipped to [0, 1], not rounded to 8 bits.

Metrics (``varformer.eval.metrics``) follow BasicSR on 8-bit images (the restored image is
rounded to 8 bits first, as when saved). LPIPS (AlexNet v0.1, ``varformer.eval.lpips``) is
measured on the same 8-bit images. The official training-time validation used crop_border 4 on
RGB at 256x256; the defaults here are crop_border 0, RGB, at the GT's resolution.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROTOCOLS = ("tiled", "resize")
WEIGHTS_HELP = ("download the released VarFormer checkpoint net_g_last.pth from the Hugging Face "
                "repo wsy541/VarFormer and pass it as --weights FILE")

__all__ = ["TestSet", "evaluate", "format_tables", "load_config",
           "run_config", "eval_main", "PROTOCOLS"]


# ----------------------------------------------------------------------------- test sets

@dataclass
class TestSet:
    """One test set: LQ/GT folders paired by ``rule``, or (``lq`` None) a GT folder with
    Gaussian noise of level ``sigma`` (0-255 scale). ``crop_border`` / ``test_y_channel``
    override evaluate()'s settings when not None."""
    task: str
    name: str
    gt: str
    lq: Optional[str] = None
    rule: Any = "same"
    sigma: Optional[float] = None
    seed: int = 0
    crop_border: Optional[int] = None
    test_y_channel: Optional[bool] = None

    def __post_init__(self):
        if (self.lq is None) == (self.sigma is None):
            raise ValueError(f"test set {self.name!r}: give either lq (a folder of degraded "
                             f"images) or sigma (Gaussian noise made from gt), not "
                             f"{'both' if self.lq is not None else 'neither'}")
        if self.sigma is not None and not (isinstance(self.sigma, (int, float))
                                           and not isinstance(self.sigma, bool)
                                           and self.sigma >= 0):
            raise ValueError(f"test set {self.name!r}: sigma must be a number >= 0 "
                             f"(0-255 scale), got {self.sigma!r}")

    @property
    def label(self) -> str:
        """Name shown in tables: ``BSD68`` or ``BSD68 (σ=25)``."""
        return self.name if self.sigma is None else f"{self.name} (σ={self.sigma:g})"

    @property
    def slug(self) -> str:
        """Folder-safe name: ``BSD68`` or ``BSD68_sigma25``."""
        text = self.name if self.sigma is None else f"{self.name}_sigma{self.sigma:g}"
        return _slug(text)

    def pairs(self) -> list[tuple[Optional[Path], Path]]:
        """[(lq_path, gt_path)] sorted, lq_path None for a noise set. Raises the errors of
        ``pair_files`` / ``list_images`` (missing folders, unmatched names)."""
        from varformer.data.pairing import list_images, pair_files

        if self.lq is None:
            return [(None, p) for p in list_images(self.gt)]
        return pair_files(self.lq, self.gt, rule=self.rule)

    def items(self):
        """Yield (name, lq, gt, lq_path): the name relative to the LQ (or GT) folder, lq and gt
        float32 [3, H, W] in [0, 1], lq_path None for a noise set (see the module docstring)."""
        from varformer.data.pairing import read_image

        if self.lq is None:
            from varformer.data.datasets import NoisyDataset

            ds = NoisyDataset(self.gt, sigma=[self.sigma], crop=None, phase="test",
                              seed=self.seed, augment=False, task=self.task)
            for i, path in enumerate(ds.files):
                item = ds[i]
                yield (path.relative_to(self.gt).as_posix(), ((item["lq"] + 1) / 2).clamp(0, 1),
                       read_image(path), None)
            return
        for lq_path, gt_path in self.pairs():
            lq, gt = read_image(lq_path), read_image(gt_path)
            if lq.shape != gt.shape:
                raise ValueError(f"{self.label}: LQ {lq_path} is {tuple(lq.shape[1:])} but GT "
                                 f"{gt_path} is {tuple(gt.shape[1:])} (H, W)")
            yield Path(lq_path).relative_to(self.lq).as_posix(), lq, gt, lq_path


def as_test_set(obj) -> TestSet:
    """A TestSet from a TestSet, a dict of its fields, or a tuple
    (task, name, lq_dir, gt_dir[, rule])."""
    if isinstance(obj, TestSet):
        return obj
    if isinstance(obj, dict):
        return TestSet(**obj)
    if isinstance(obj, (tuple, list)) and len(obj) in (4, 5):
        task, name, lq, gt, *rule = obj
        return TestSet(task=task, name=name, lq=str(lq), gt=str(gt),
                       rule=rule[0] if rule else "same")
    raise TypeError(f"test set: expected a TestSet, a dict or (task, name, lq_dir, gt_dir, rule), "
                    f"got {obj!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "set"


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, test_sets, *, protocol: str = "tiled", save_dir=None, device="cpu",
             lpips=None, crop_border: int = 0, test_y_channel: bool = False, tile: int = 256,
             overlap: int = 32, batch_size: int = 8, log=None) -> list[dict]:
    """Restore and score every image of ``test_sets`` (TestSet, dicts or tuples, see
    ``as_test_set``).

    model: callable [n, 3, tile, tile] in [-1, 1] -> same (an nn.Module is moved to ``device``
    and run in eval mode; its training flag is restored afterwards). lpips: an ``LPIPS`` module
    or None. save_dir: if given, restored images go to
    ``save_dir/<protocol>/<task>/<set slug>/<name>.png``. log: optional callable(str).

    Returns rows (dicts). Per image: protocol, tile, overlap, task, set (the label), sigma,
    image (name relative to the LQ folder), psnr, ssim, lpips (None without LPIPS),
    crop_border, y_channel. Per set, after its images: the same keys with ``image`` None, the
    metric means and ``n`` (the number of images).
    """
    import torch

    from varformer._progress import Progress
    from varformer.eval.metrics import psnr, ssim
    from varformer.restoration import check_options, restore, save_image

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    check_options(tile, overlap, batch_size, protocol)
    sets = [as_test_set(s) for s in test_sets]
    is_module = isinstance(model, torch.nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.to(device).eval()
    if lpips is not None:
        lpips = lpips.to(device).eval()
    rows = []
    try:
        for ts in sets:
            crop = crop_border if ts.crop_border is None else ts.crop_border
            y_chan = test_y_channel if ts.test_y_channel is None else ts.test_y_channel
            common = dict(protocol=protocol, tile=tile, overlap=overlap, task=ts.task,
                          set=ts.label, sigma=ts.sigma, crop_border=crop, y_channel=bool(y_chan))
            set_rows = []
            bar = Progress(len(ts.pairs()), f"[{protocol}] {ts.task} / {ts.label} images")
            for name, lq, gt, _ in ts.items():
                out = restore(model, lq, tile=tile, overlap=overlap, batch_size=batch_size,
                              mode=protocol, device=device)
                bar.update()
                out8 = (out.clamp(0, 1) * 255).round() / 255  # what a saved image holds
                row = dict(common, image=name, psnr=psnr(out8, gt, crop, y_chan),
                           ssim=ssim(out8, gt, crop, y_chan), lpips=None)
                if lpips is not None:
                    gt8 = (gt * 255).round() / 255
                    with torch.no_grad():
                        row["lpips"] = float(lpips(out8.to(device), gt8.to(device),
                                                   normalize=True)[0])
                if save_dir is not None:
                    dst = Path(save_dir, protocol, _slug(ts.task), ts.slug, name)
                    dst = dst.with_suffix(".png")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    save_image(out8, dst)
                set_rows.append(row)
            bar.close()
            mean = dict(common, image=None, n=len(set_rows),
                        psnr=_mean(r["psnr"] for r in set_rows),
                        ssim=_mean(r["ssim"] for r in set_rows),
                        lpips=_mean(r["lpips"] for r in set_rows))
            rows += set_rows + [mean]
            if log is not None:
                log(f"[{protocol}] {ts.task} / {ts.label}: {len(set_rows)} images, "
                    f"PSNR {mean['psnr']:.2f}, SSIM {mean['ssim']:.4f}"
                    + (f", LPIPS {mean['lpips']:.4f}" if mean["lpips"] is not None else ""))
    finally:
        if is_module:
            model.train(was_training)
    return rows


def _mean(values) -> Optional[float]:
    """Mean of the values, None if any is None (or there are none)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- tables

_PROTOCOL_TEXT = {
    "tiled": "full resolution, {tile}x{tile} tiles overlapping by {overlap} px (varformer.restore)",
    "resize": "official: bicubic resize to {tile}x{tile}, model, bicubic back to the GT size",
}
_CSV_FIELDS = ("protocol", "task", "set", "sigma", "images", "psnr", "ssim", "lpips",
               "crop_border", "y_channel")


def _table_rows(rows) -> list[dict]:
    """Set means in order, plus per task with several noise-free sets a 'mean of k sets' row
    (the unweighted mean of the set means, like the paper's 'Deraining (5 sets)')."""
    means = [r for r in rows if r.get("image") is None]
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in means):
        prot = [r for r in means if r["protocol"] == protocol]
        for task in dict.fromkeys(r["task"] for r in prot):
            group = [r for r in prot if r["task"] == task]
            out += [dict(r, images=r["n"]) for r in group]
            if len(group) > 1 and all(r["sigma"] is None for r in group):
                same = all((r["crop_border"], r["y_channel"]) ==
                           (group[0]["crop_border"], group[0]["y_channel"]) for r in group)
                out.append(dict(group[0], set=f"mean of {len(group)} sets", sigma=None,
                                images=sum(r["n"] for r in group),
                                psnr=_mean(r["psnr"] for r in group),
                                ssim=_mean(r["ssim"] for r in group),
                                lpips=_mean(r["lpips"] for r in group),
                                crop_border=group[0]["crop_border"] if same else "mixed",
                                y_channel=group[0]["y_channel"] if same else "mixed"))
    return out


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def format_tables(rows) -> tuple[str, str]:
    """Rows from ``evaluate`` -> (markdown, csv text). Markdown: per protocol a header stating
    the protocol and metric settings and a table | Task | Test set | Images | PSNR↑ | SSIM↑ |
    (LPIPS↓ when measured); the per-set metric settings get a column where they differ. CSV:
    one line per table row with the columns of ``_CSV_FIELDS``."""
    table = _table_rows(rows)
    parts = []
    for protocol in dict.fromkeys(r["protocol"] for r in table):
        prot = [r for r in table if r["protocol"] == protocol]
        first = prot[0]
        text = _PROTOCOL_TEXT[protocol].format(tile=first["tile"], overlap=first["overlap"])
        settings = {(r["crop_border"], r["y_channel"]) for r in prot}
        with_lpips = any(r["lpips"] is not None for r in prot)
        lines = [f"### Protocol: {protocol} — {text}", ""]
        if len(settings) == 1:
            crop, y = settings.pop()
            lines += [f"PSNR (dB) / SSIM on {'the Y channel (BT.601)' if y else 'RGB'}, "
                      f"8-bit images, crop border {crop}"
                      + ("; LPIPS: AlexNet, v0.1" if with_lpips else "") + ".", ""]
            per_row = False
        else:
            lines += ["PSNR (dB) / SSIM on 8-bit images; channel and crop border per row"
                      + ("; LPIPS: AlexNet, v0.1" if with_lpips else "") + ".", ""]
            per_row = True
        head = ["Task", "Test set", "Images", "PSNR↑", "SSIM↑"] + (["LPIPS↓"] * with_lpips) \
            + (["Metric on"] * per_row)
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in prot:
            cells = [r["task"], r["set"], str(r["images"]), _fmt(r["psnr"], 2),
                     _fmt(r["ssim"], 4)]
            if with_lpips:
                cells.append(_fmt(r["lpips"], 4))
            if per_row:
                chan = {True: "Y", False: "RGB"}.get(r["y_channel"], "mixed")
                cells.append(f"{chan}, crop {r['crop_border']}")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    markdown = "\n\n".join(parts) + "\n"

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in table:
        writer.writerow({k: _csv_value(r.get(k)) for k in _CSV_FIELDS})
    return markdown, buf.getvalue()


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6f}"
    return v


def _per_image_csv(rows) -> str:
    fields = ("protocol", "task", "set", "sigma", "image", "psnr", "ssim", "lpips",
              "crop_border", "y_channel")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        if r.get("image") is not None:
            writer.writerow({k: _csv_value(r.get(k)) for k in fields})
    return buf.getvalue()


# ----------------------------------------------------------------------------- config

_TOP_KEYS = {"root", "crop_border", "test_y_channel", "tile", "overlap", "sets"}
_SET_KEYS = {"task", "name", "lq", "gt", "rule", "sigma", "seed", "crop_border", "test_y_channel"}


@dataclass
class EvalConfig:
    """A parsed config: the test sets (paths resolved) and the run settings."""
    sets: list = field(default_factory=list)
    crop_border: int = 0
    test_y_channel: bool = False
    tile: int = 256
    overlap: int = 32


def load_config(path) -> EvalConfig:
    """Read a YAML config (format in the module docstring). Raises ValueError naming the
    problem; the folders themselves are checked when the sets are paired."""
    import yaml

    path = Path(path)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("sets"), list) or not data["sets"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty list 'sets'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    root = path.parent / str(data.get("root", "."))
    cfg = EvalConfig(crop_border=int(data.get("crop_border", 0)),
                     test_y_channel=bool(data.get("test_y_channel", False)),
                     tile=int(data.get("tile", 256)), overlap=int(data.get("overlap", 32)))
    for i, entry in enumerate(data["sets"]):
        where = f"{path}: sets[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {entry!r}")
        unknown = set(entry) - _SET_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(_SET_KEYS)}")
        missing = [k for k in ("task", "name", "gt") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        entry = dict(entry, task=str(entry["task"]), name=str(entry["name"]),
                     gt=str(root / str(entry["gt"])))
        if entry.get("lq") is not None:
            entry["lq"] = str(root / str(entry["lq"]))
        sigmas = entry.pop("sigma", None)
        try:
            if isinstance(sigmas, list):
                cfg.sets += [TestSet(**entry, sigma=s) for s in sigmas]
            else:
                cfg.sets.append(TestSet(**entry, sigma=sigmas))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    return cfg


# ----------------------------------------------------------------------------- driver

def run_config(cfg: EvalConfig, *, model, out_dir, protocols=PROTOCOLS, device="cpu",
               lpips=None, batch_size: int = 8, log=None, title: str = "VarFormer evaluation"
               ) -> list[dict]:
    """Evaluate ``model`` on every set of ``cfg`` for each protocol; writes ``results.md``,
    ``results.csv``, ``per_image.csv`` and the restored images under ``out_dir``. Returns the
    rows of ``evaluate``."""
    rows = []
    for protocol in protocols:
        rows += evaluate(model, cfg.sets, protocol=protocol, save_dir=out_dir, device=device,
                         lpips=lpips, crop_border=cfg.crop_border,
                         test_y_channel=cfg.test_y_channel, tile=cfg.tile, overlap=cfg.overlap,
                         batch_size=batch_size, log=log)
    markdown, csv_text = format_tables(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"# {title}\n\n{markdown}", encoding="utf-8")
    (out / "results.csv").write_text(csv_text, encoding="utf-8")
    (out / "per_image.csv").write_text(_per_image_csv(rows), encoding="utf-8")
    return rows


def _load_model(weights: str, mode, device: str, preset=None):
    """VarFormer weights (released size, or the small preset) on ``device`` in eval mode."""
    from varformer.models import VarFormer

    return VarFormer.from_pretrained(weights, mode=mode, preset=preset).to(device).eval()


def _model_label(model, weights: str, mode) -> str:
    """'net_g_last.pth, mode official' for the results title."""
    return f"{os.path.basename(weights)}, mode {getattr(model, 'mode', mode)}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="varformer eval",
        description="PSNR / SSIM (/ LPIPS) of VarFormer on the test sets of a YAML config; "
                    "writes results.md, results.csv, per_image.csv and the restored images.")
    ap.add_argument("config", help="YAML file listing the test sets (see varformer.eval.runner)")
    ap.add_argument("--weights", metavar="FILE",
                    help="checkpoint net_g_last.pth (Hugging Face repo wsy541/VarFormer), a "
                         ".safetensors file of varformer train, or its run folder")
    ap.add_argument("--protocol", choices=["tiled", "resize", "both"], default="both",
                    help="tiled: full resolution; resize: official 256x256 and back (default both)")
    ap.add_argument("--out", default="eval_results", metavar="DIR",
                    help="output folder (default eval_results)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    ap.add_argument("--mode", choices=["official", "paper"], default=None,
                    help="model variant (default: the checkpoint's metadata, as written by "
                         "varformer train; official for the released weights)")
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per model call (default 8)")
    ap.add_argument("--preset", choices=["full", "small"], default=None,
                    help="model size: full (released) or small (VarFormer.small); default: the "
                         "checkpoint's metadata, else full")
    ap.add_argument("--lpips-backbone", metavar="FILE",
                    help="torchvision AlexNet weights alexnet-owt-7be5be79.pth "
                         "(with --lpips-linear)")
    ap.add_argument("--lpips-linear", metavar="FILE",
                    help="lpips package file lpips/weights/v0.1/alex.pth (with --lpips-backbone)")
    ap.add_argument("--table5", nargs="+", metavar="RUN",
                    help="the paper's Table 5 for these runs instead of --weights: run folders "
                         "or checkpoints (their ablation switches from the metadata); rows = "
                         "runs, columns = PSNR / SSIM averaged over the config's tasks "
                         "(varformer.eval.table5)")
    return ap


def eval_main(argv=None, *, _model=None) -> int:
    """``varformer eval``; returns the exit status (2 for usage and input errors)."""
    args = _parser().parse_args(argv)
    # _model (not a command-line option): a model object to use instead of --weights (tests)
    if args.table5:
        from .table5 import table5_main
        return table5_main(args)

    def fail(message) -> int:
        print(f"varformer eval: {message}", file=sys.stderr)
        return 2

    # checked before anything heavy is imported or built
    if _model is None and not args.weights:
        return fail(f"--weights FILE is required; {WEIGHTS_HELP}")
    if _model is None:
        from varformer.cli import resolve_weights
        try:
            args.weights = resolve_weights(args.weights)
        except (ValueError, OSError, KeyError) as e:
            return fail(str(e))
    if _model is None and not os.path.isfile(args.weights):
        return fail(f"weights file {args.weights!r} not found; {WEIGHTS_HELP}")
    if not os.path.isfile(args.config):
        return fail(f"config file {args.config!r} not found")
    if (args.lpips_backbone is None) != (args.lpips_linear is None):
        return fail("give both --lpips-backbone and --lpips-linear, or neither")
    from varformer.eval.lpips import BACKBONE_HELP, LINEAR_HELP
    for path, help_text in ((args.lpips_backbone, BACKBONE_HELP), (args.lpips_linear, LINEAR_HELP)):
        if path is not None and not os.path.isfile(path):
            return fail(f"LPIPS file {path!r} not found; {help_text}")
    try:
        cfg = load_config(args.config)
        for ts in cfg.sets:        # pairing errors surface before the model is built
            ts.pairs()
    except Exception as e:  # yaml, pairing and folder errors
        return fail(f"{type(e).__name__}: {e}")

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but torch sees no CUDA device")
    lpips = None
    if args.lpips_backbone:
        from varformer.eval.lpips import LPIPS
        lpips = LPIPS.from_files(args.lpips_backbone, args.lpips_linear)
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    if _model is not None:
        model, label = _model, f"{type(_model).__name__}, mode {args.mode or 'official'}"
    else:
        try:
            model = _load_model(args.weights, args.mode, device, args.preset)
        except Exception as e:  # mismatch, foreign or corrupt file: one line
            from varformer.cli import weights_error
            return fail(weights_error(args.weights, e))
        label = _model_label(model, args.weights, args.mode)
        from varformer.cli import served_tile
        served = served_tile(model)
        if served is not None and cfg.tile != served:
            return fail(f"tile: {cfg.tile} in {args.config}: VarFormer works on "
                        f"{served}x{served} tiles only; set tile: {served} (overlap: "
                        f"0-{served - 1} is free)")
    rows = run_config(cfg, model=model, out_dir=args.out, protocols=protocols, device=device,
                      lpips=lpips, batch_size=args.batch_size,
                      log=lambda s: print(s, file=sys.stderr),
                      title=f"VarFormer evaluation ({label})")
    print(format_tables(rows)[0])
    print(f"written to {args.out}: results.md, results.csv, per_image.csv, images",
          file=sys.stderr)
    return 0
