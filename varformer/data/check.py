"""``varformer data check CONFIG``: verify a dataset layout before training or evaluation
(and ``varformer data sample DIR``: small demo pairs, ``varformer.data.sample``).

For every training task and test set of the data config (see ``varformer.data.datasets``):
the folders exist, every LQ file has its GT partner by name (and, strict, every GT its LQ),
and a sample of the pairs (``--sample N`` evenly spaced per set, default 16; ``--all`` for
every file) is readable with equal LQ/GT sizes. Training images smaller than the crop are
reported as notes (they are padded). Prints a table of counts per split and set, then the
errors; exit status 0 if there are none, else 1.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from .datasets import load_data_config, resolve_test_layouts, resolve_train_layouts
from .pairing import list_images, pair_files, read_image


@dataclass
class CheckReport:
    """rows: one dict per (split, set): split, task, name, kind, pairs, checked, status."""
    rows: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    sample: Optional[int] = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def table(self) -> str:
        head = ("split", "task", "set", "kind", "pairs", "checked", "status")
        lines = [head] + [(r["split"], r["task"], r["name"], r["kind"],
                           "-" if r["pairs"] is None else str(r["pairs"]), str(r["checked"]),
                           r["status"]) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
        return "\n".join([fmt(lines[0]), fmt(tuple("-" * w for w in widths))]
                         + [fmt(line) for line in lines[1:]])

    def text(self) -> str:
        out = [self.table(), ""]
        generated = bool(self.rows) and all(r["kind"] == "generated" for r in self.rows)
        if not generated:
            out.append("images read: " + ("all" if self.sample is None else
                                          f"up to {self.sample} pairs per set (evenly spaced)"))
        out += [f"note: {n}" for n in self.notes]
        if self.errors:
            out.append(f"{len(self.errors)} error(s):")
            out += [f"  - {e}" for e in self.errors]
        elif generated:
            out.append("OK: synthetic data only; nothing on disk to check")
        else:
            out.append("OK: all layouts complete")
        return "\n".join(out)


def _spaced(items: list, n: Optional[int]) -> list:
    if n is None or len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def _check_set(spec: dict, split: str, crop, sample, report: CheckReport) -> None:
    row = {"split": split, "task": spec["task"], "name": spec["name"], "kind": spec["kind"],
           "pairs": None, "checked": 0, "status": "ok"}
    report.rows.append(row)
    where = f"{split} {spec['name']}"
    errors_before = len(report.errors)
    for role in ("lq", "gt") if spec["kind"] == "paired" else ("gt",):
        if not spec[role].is_dir():
            report.errors.append(f"{where}: {role.upper()} folder missing: {spec[role]}")
    if len(report.errors) > errors_before:
        row["status"] = "MISSING"
        return
    try:
        if spec["kind"] == "paired":
            pairs = pair_files(spec["lq"], spec["gt"], spec["rule"], strict=spec["strict"],
                               match_subdirs=spec["match_subdirs"])
        else:
            pairs = [(p, p) for p in list_images(spec["gt"])]
    except (ValueError, OSError) as e:
        report.errors.append(f"{where}: {e}")
        row["status"] = "UNPAIRED"
        return
    pairs = pairs[:spec["limit"]]
    row["pairs"] = len(pairs)
    small = 0
    for lq_path, gt_path in _spaced(pairs, sample):
        try:
            gt = read_image(gt_path)
            lq = read_image(lq_path) if lq_path != gt_path else gt
        except OSError as e:
            report.errors.append(f"{where}: {e}")
            row["status"] = "UNREADABLE"
            continue
        row["checked"] += 1
        if lq.shape != gt.shape:
            report.errors.append(f"{where}: LQ/GT size mismatch: {lq_path} is "
                                 f"{tuple(lq.shape[1:])}, {gt_path} is {tuple(gt.shape[1:])}")
            row["status"] = "SIZE"
        elif split == "train" and crop and min(gt.shape[1:]) < crop:
            small += 1
    if small:
        report.notes.append(f"{where}: {small} of {row['checked']} checked images are smaller "
                            f"than the crop {crop} (they are padded)")


def check(config, sample: Optional[int] = 16, print_report: bool = True,
          file=None) -> CheckReport:
    """Verify the layouts of ``config`` (a YAML path or a dict; a ``data:`` section is
    unwrapped). ``sample``: pairs read per set (None = all). Prints the report unless
    ``print_report`` is false."""
    report = CheckReport(sample=sample)
    synthetic = _synthetic_sections(config)
    if synthetic:
        for where, spec in synthetic:
            spec = spec if isinstance(spec, dict) else {}
            n, size = spec.get("n", 16 if where == "data" else 2), spec.get("size", 256)
            report.rows.append({"split": "train" if where == "data" else "val",
                                "task": "synthetic", "name": f"{where}.synthetic",
                                "kind": "generated", "pairs": n, "checked": 0, "status": "ok"})
            report.notes.append(f"{where}: synthetic pairs ({n} random {size}x{size} images "
                                f"made in memory; no files are read)")
        if print_report:
            print(report.text(), file=file or sys.stdout)
        return report
    try:
        cfg = load_data_config(config)
        crop = cfg.get("crop", 256)
        specs = [("train", s) for s in resolve_train_layouts(cfg)] if cfg.get("tasks") else []
        specs += [("test", s) for s in resolve_test_layouts(cfg)]
        if not specs:
            report.errors.append("data config names no training tasks and no test sets")
    except Exception as e:  # a bad config file (missing, YAML syntax, wrong keys) is a finding
        report.errors.append(f"config: {type(e).__name__}: {e}")
        specs = []
    for split, spec in specs:
        _check_set(spec, split, crop, sample, report)
    if print_report:
        print(report.text(), file=file or sys.stdout)
    return report


def _synthetic_sections(config):
    """[(section, spec)] of a training config's ``data.synthetic`` / ``val.synthetic`` (the
    in-memory pairs of ``varformer.train.synthetic``); [] for anything else."""
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        try:
            import yaml
            with open(config) as f:
                config = yaml.safe_load(f) or {}
        except Exception:  # reported by the regular path
            return []
    if not isinstance(config, dict):
        return []
    sections = {"data": config.get("data")} if isinstance(config.get("data"), dict) \
        else {"data": config}
    if isinstance(config.get("val"), dict):
        sections["val"] = config["val"]
    found = [(k, v["synthetic"]) for k, v in sections.items() if "synthetic" in v]
    if found and "synthetic" in sections["data"]:
        return found
    return []


def data_main(argv=None) -> int:
    """``varformer data check CONFIG [--sample N | --all]`` (``argv`` starts with ``check``);
    returns the exit status."""
    parser = argparse.ArgumentParser(prog="varformer data",
                                     description="dataset utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="verify folders, pairing and readability of a data config",
                       description=__doc__.split("\n\n")[1]
                       + " A config with synthetic data (configs/tiny_cpu.yml) reads no files;"
                         " the check says so.")
    p.add_argument("config", help="YAML file (its 'data:' section, or the whole file)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sample", type=int, default=16, metavar="N",
                       help="pairs read per set, evenly spaced (default 16)")
    group.add_argument("--all", action="store_true", help="read every image")
    q = sub.add_parser("sample", help="write a few small noisy/clean image pairs to try the "
                                      "commands on (DIR/lq, DIR/gt)",
                       description="Write N small LQ/GT pairs (smooth random colour images; LQ "
                                   "with Gaussian noise) as DIR/lq/sample_<i>.png and "
                                   "DIR/gt/sample_<i>.png, the layout configs/eval.yml reads.")
    q.add_argument("folder", metavar="DIR")
    q.add_argument("--n", type=int, default=2, help="number of pairs (default 2)")
    q.add_argument("--size", default="96x128", metavar="HxW", help="image size (default 96x128)")
    q.add_argument("--sigma", type=float, default=25.0,
                   help="noise level of the LQ images, 0-255 scale (default 25)")
    args = parser.parse_args(argv)
    if args.command == "sample":
        from .sample import make_samples
        try:
            h, w = (int(v) for v in args.size.lower().split("x"))
            pairs = make_samples(args.folder, args.n, h, w, args.sigma)
        except ValueError as e:
            print(f"varformer data sample: {e} (--size HxW, --n, --sigma)", file=sys.stderr)
            return 2
        print(f"wrote {len(pairs)} pairs to {args.folder}/lq and {args.folder}/gt")
        return 0
    report = check(args.config, sample=None if args.all else args.sample)
    return 0 if report.ok else 1
