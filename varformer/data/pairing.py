"""Pair degraded (LQ) and clean (GT) image files by name, and read images.

The official code pairs the i-th file of the sorted LQ list with the i-th file of the sorted GT
list (spec §4.5), which silently mis-pairs when one file is missing. Here every LQ file is
matched to its GT file by *name*:

- ``list_images(folder)``: image files under ``folder`` (recursive, sorted), extensions
  png/jpg/jpeg/bmp/tif/tiff in any case; hidden files are skipped.
- ``pair_files(lq_dir, gt_dir, rule)``: ``rule`` maps an LQ file name (``"0001_0.8_0.2.jpg"``)
  to a GT file name. If a GT file of exactly that name exists (in the same sub-folder, relative
  to ``gt_dir``) it is used; otherwise any GT image with the same *stem* matches, so ``"0001"``
  or ``"0001.png"`` finds ``0001.jpg``. Several LQ files may share one GT (RESIDE: 35 hazy
  images per clear image).
- ``read_image(path)``: float32 tensor [3, H, W] in [0, 1], RGB.

Named rules (``RULES``):

=========  =======================================================  ========================
name       LQ -> GT                                                  datasets
=========  =======================================================  ========================
same       identical stem, any image extension (default)             Rain13K, LOL, GoPro, ...
reside     id before the first underscore: 0001_0.8_0.2.jpg -> 0001  RESIDE OTS / SOTS
rain100    rain-001.png -> norain-001 (original Rain100L/H names)    Rain100L, Rain100H
sidd       NOISY_SRGB_010.PNG -> GT_SRGB_010 (original SIDD names)   SIDD
=========  =======================================================  ========================

A rule may also be any callable ``str -> str``, or a dict ``{"pattern": regex, "repl": str}``
(``re.sub`` on the LQ stem), which is the form a YAML config can express.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Union

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_LISTED = 5          # file names listed in an error message

Rule = Union[None, str, dict, Callable[[str], str]]


def _rule_reside(name: str) -> str:
    return Path(name).stem.split("_")[0]


def _rule_rain100(name: str) -> str:
    stem = Path(name).stem
    return "no" + stem if stem.startswith("rain") else stem


def _rule_sidd(name: str) -> str:
    return Path(name).stem.replace("NOISY", "GT")


RULES: dict[str, Callable[[str], str]] = {
    "same": lambda name: Path(name).stem,
    "reside": _rule_reside,
    "rain100": _rule_rain100,
    "sidd": _rule_sidd,
}


def is_image(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _listing(names, more: int = 0) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:MAX_LISTED])
    extra = len(names) - MAX_LISTED + more
    return shown + (f" (and {extra} more)" if extra > 0 else "")


def list_images(folder: Union[str, Path], recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, sorted by path. Errors if the folder is missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {folder}")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if not recursive:
            dirnames[:] = []
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image(f)]
    if not found:
        raise ValueError(f"no image files ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
                         f"in folder: {folder}")
    return sorted(found)


def resolve_rule(rule: Rule) -> Callable[[str], str]:
    """A rule as a callable ``lq file name -> gt file name (or stem)``."""
    if rule is None:
        return RULES["same"]
    if callable(rule):
        return rule
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"unknown pairing rule {rule!r}; named rules: {', '.join(RULES)}"
                             " (or a callable, or {'pattern': regex, 'repl': str})")
        return RULES[rule]
    if isinstance(rule, dict) and set(rule) == {"pattern", "repl"}:
        pattern, repl = re.compile(rule["pattern"]), rule["repl"]
        return lambda name: pattern.sub(repl, Path(name).stem)
    raise TypeError(f"pairing rule must be a name, a callable or {{'pattern', 'repl'}}, "
                    f"got {rule!r}")


def pair_files(lq_dir: Union[str, Path], gt_dir: Union[str, Path], rule: Rule = None,
               strict: bool = True, recursive: bool = True,
               match_subdirs: bool = True) -> list[tuple[Path, Path]]:
    """Match every LQ image to its GT image by name; returns [(lq_path, gt_path)] sorted by LQ.

    Sub-folders are kept: ``lq_dir/a/x.png`` pairs with ``gt_dir/a/<rule(x.png)>``; with
    ``match_subdirs=False`` the GT name is looked up anywhere under ``gt_dir`` (for LQ trees
    split into parts, like RESIDE ``haze/part1``, next to a flat GT folder).
    Raises ValueError naming the files when an LQ file has no GT partner, when a GT name is
    ambiguous (``0001.png`` and ``0001.jpg``), or, if ``strict``, when GT files are left without
    an LQ partner. A missing or empty folder is an error naming the folder.
    """
    lq_dir, gt_dir = Path(lq_dir), Path(gt_dir)
    fn = resolve_rule(rule)
    lq_files = list_images(lq_dir, recursive)
    gt_files = list_images(gt_dir, recursive)
    by_name, by_stem = defaultdict(list), defaultdict(list)
    strip = (lambda rel: rel) if match_subdirs else (lambda rel: Path(rel.name))
    for p in gt_files:
        rel = strip(p.relative_to(gt_dir))
        by_name[rel.as_posix()].append(p)
        by_stem[rel.with_suffix("").as_posix()].append(p)
    pairs, missing, ambiguous, used = [], [], [], set()
    for lq in lq_files:
        rel = strip(lq.relative_to(lq_dir))
        target = rel.parent / str(fn(rel.name))
        cands = by_name.get(target.as_posix(), [])     # exact name first, then any extension
        if not cands:
            if target.suffix.lower() in IMAGE_EXTENSIONS:
                target = target.with_suffix("")
            cands = by_stem.get(target.as_posix(), [])
        if len(cands) != 1:
            wanted = target.as_posix() + ".*"
            (missing if not cands else ambiguous).append(
                f"{rel.as_posix()} (wants {wanted}"
                + (f": {', '.join(c.relative_to(gt_dir).as_posix() for c in cands)})"
                   if cands else ")"))
            continue
        gt = cands[0]
        pairs.append((lq, gt))
        used.add(gt)
    problems = []
    if missing:
        problems.append(f"{len(missing)} LQ file(s) in {lq_dir} have no GT partner in {gt_dir}: "
                        + _listing(missing))
    if ambiguous:
        problems.append(f"{len(ambiguous)} LQ file(s) in {lq_dir} match several GT files in "
                        f"{gt_dir}: " + _listing(ambiguous))
    unused = [p.relative_to(gt_dir).as_posix() for p in gt_files if p not in used]
    if strict and unused:
        problems.append(f"{len(unused)} GT file(s) in {gt_dir} have no LQ partner in {lq_dir}: "
                        + _listing(unused))
    if problems:
        rule_name = rule if isinstance(rule, str) or rule is None else "custom"
        raise ValueError(f"pairing (rule {rule_name or 'same'!s}) failed: " + "; ".join(problems))
    return pairs


def read_image(path: Union[str, Path]):
    """Read an image file as a float32 tensor [3, H, W] in [0, 1], RGB.

    ``varformer.restoration.read_image_file`` without the alpha channel: every PIL mode
    (grey repeated to 3 channels, palette, CMYK, 16-bit grey and colour PNGs and TIFFs scaled
    by 1/65535, float images in [0, 1]), EXIF orientation applied. Raises OSError naming the
    file if it cannot be read, decoded or converted faithfully.
    """
    from varformer.restoration import read_image_file

    try:
        return read_image_file(path).rgb
    except OSError as e:
        reason = str(e)
        if reason.startswith(f"{path}: "):
            reason = reason[len(f"{path}: "):]
        raise OSError(f"cannot read image {path}: {reason}") from None


def stable_seed(*parts) -> int:
    """A 63-bit integer from ``parts`` that is the same in every process and run
    (Python's ``hash`` of a str is salted per process)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
