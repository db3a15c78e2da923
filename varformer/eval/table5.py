"""The paper's Table 5 (ablations of the components) for a list of runs.

``varformer eval EVAL.yml --table5 RUN [RUN ...]``: each RUN (a ``varformer train`` run
folder, its checkpoint, or any weights file ``VarFormer.from_pretrained`` reads; the model's
Table-5 switches come from the checkpoint's metadata) is evaluated on every test set of the
eval config, and one row per run and protocol is printed:

    | Exp. | Run | Mode | skip | adapter | AFT | DAE | PSNR↑ | SSIM↑ |

PSNR / SSIM are the paper's "average performance across six tasks": per task (the ``task`` of
the config's sets) the unweighted mean of its set means (every set and noise level counts
once), then the unweighted mean over the tasks. ``Exp.`` is the Table-5 letter (a-f) of the
run's switches, "–" for other combinations. Written to ``--out``: ``table5.md`` and
``table5.csv`` (also the per-task means).
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

SWITCH_COLUMNS = (("skip", "skip"), ("adapter", "adapter"), ("aft", "AFT"), ("dae", "DAE"))


def _mean(values) -> Optional[float]:
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def task_average(rows) -> Dict[str, Dict]:
    """Rows of ``evaluate`` (per image and per set) -> {protocol: {"tasks": {task: (psnr,
    ssim)}, "psnr": mean over tasks, "ssim": ..., "n_sets": k}}."""
    out: Dict[str, Dict] = {}
    means = [r for r in rows if r.get("image") is None]
    for protocol in dict.fromkeys(r["protocol"] for r in means):
        prot = [r for r in means if r["protocol"] == protocol]
        tasks = {}
        for task in dict.fromkeys(r["task"] for r in prot):
            group = [r for r in prot if r["task"] == task]
            tasks[task] = (_mean(r["psnr"] for r in group), _mean(r["ssim"] for r in group))
        out[protocol] = {"tasks": tasks, "n_sets": len(prot),
                         "psnr": _mean(p for p, _ in tasks.values()),
                         "ssim": _mean(s for _, s in tasks.values())}
    return out


def _fmt(v, digits: int) -> str:
    if v is None:
        return "–"
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def format_table5(entries: Sequence[Dict]) -> tuple[str, str]:
    """entries: [{"run": label, "mode": str, "ablation": {switch: bool}, "results":
    task_average(...)}] -> (markdown: one table per protocol, csv: one line per run and
    protocol with the per-task means)."""
    from varformer.models.varformer import table5_letter

    protocols = list(dict.fromkeys(p for e in entries for p in e["results"]))
    parts = []
    for protocol in protocols:
        first = next(e["results"][protocol] for e in entries if protocol in e["results"])
        tasks = list(first["tasks"])
        lines = [f"### Table 5 — protocol {protocol}: mean over {len(tasks)} task(s) "
                 f"({', '.join(tasks)}), each the mean of its test sets", "",
                 "| Exp. | Run | Mode | " + " | ".join(c for _, c in SWITCH_COLUMNS)
                 + " | PSNR↑ | SSIM↑ |", "|" + "---|" * (5 + len(SWITCH_COLUMNS))]
        for e in entries:
            res = e["results"].get(protocol)
            if res is None:
                continue
            marks = ["✓" if e["ablation"][k] else "" for k, _ in SWITCH_COLUMNS]
            lines.append(f"| {table5_letter(e['ablation']) or '–'} | {e['run']} | {e['mode']} | "
                         + " | ".join(marks)
                         + f" | {_fmt(res['psnr'], 2)} | {_fmt(res['ssim'], 3)} |")
        parts.append("\n".join(lines))
    markdown = "\n\n".join(parts) + "\n"

    tasks_all = list(dict.fromkeys(t for e in entries for r in e["results"].values()
                                   for t in r["tasks"]))
    fields = (["protocol", "exp", "run", "mode"] + [k for k, _ in SWITCH_COLUMNS]
              + ["psnr", "ssim"] + [f"{t} {m}" for t in tasks_all for m in ("psnr", "ssim")])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for protocol in protocols:
        for e in entries:
            res = e["results"].get(protocol)
            if res is None:
                continue
            row = [protocol, table5_letter(e["ablation"]) or "", e["run"], e["mode"]]
            row += [str(e["ablation"][k]).lower() for k, _ in SWITCH_COLUMNS]
            row += [_csv(res["psnr"]), _csv(res["ssim"])]
            for t in tasks_all:
                p, s = res["tasks"].get(t, (None, None))
                row += [_csv(p), _csv(s)]
            w.writerow(row)
    return markdown, buf.getvalue()


def _csv(v) -> str:
    if v is None:
        return ""
    return "inf" if math.isinf(v) else f"{v:.6f}"


def table5_main(args) -> int:
    """``varformer eval CONFIG --table5 RUN ...`` (args from the eval parser)."""
    from varformer.cli import resolve_weights, weights_error

    from .runner import PROTOCOLS, evaluate, load_config

    def fail(message) -> int:
        print(f"varformer eval --table5: {message}", file=sys.stderr)
        return 2

    if args.weights:
        return fail("--weights and --table5 exclude each other (the runs are the weights)")
    if args.lpips_backbone or args.lpips_linear:
        return fail("Table 5 reports PSNR / SSIM only; drop the LPIPS options")
    if not os.path.isfile(args.config):
        return fail(f"config file {args.config!r} not found")
    files = []
    for run in args.table5:
        try:
            path = resolve_weights(run)
        except (ValueError, OSError) as e:
            return fail(f"run {run!r}: {e}")
        if not os.path.isfile(path):
            return fail(f"run {run!r}: no weights file or run folder there")
        files.append(path)
    try:
        cfg = load_config(args.config)
        for ts in cfg.sets:
            ts.pairs()
    except Exception as e:  # yaml, pairing and folder errors
        return fail(f"{type(e).__name__}: {e}")

    import torch

    from varformer.models import VarFormer
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but torch sees no CUDA device")
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    entries: List[Dict] = []
    for run, path in zip(args.table5, files):
        try:
            model = VarFormer.from_pretrained(path, mode=args.mode, preset=args.preset)
        except Exception as e:  # mismatch, foreign or corrupt file: one line
            return fail(f"run {run!r}: {weights_error(path, e)}")
        model = model.to(device).eval()
        rows = []
        for protocol in protocols:
            rows += evaluate(model, cfg.sets, protocol=protocol, device=device,
                             crop_border=cfg.crop_border, test_y_channel=cfg.test_y_channel,
                             tile=cfg.tile, overlap=cfg.overlap, batch_size=args.batch_size,
                             log=lambda s, r=run: print(f"[{r}] {s}", file=sys.stderr))
        entries.append({"run": run, "mode": model.mode,
                        "ablation": dict(getattr(model, "ablation", None)
                                         or dict.fromkeys(("skip", "adapter", "aft", "dae"),
                                                          True)),
                        "results": task_average(rows)})
        del model
    markdown, csv_text = format_table5(entries)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table5.md"), "w", encoding="utf-8") as f:
        f.write("# Table 5: ablations of the components\n\n" + markdown)
    with open(os.path.join(args.out, "table5.csv"), "w", encoding="utf-8") as f:
        f.write(csv_text)
    print(markdown)
    print(f"written to {args.out}: table5.md, table5.csv", file=sys.stderr)
    return 0


__all__ = ["task_average", "format_table5", "table5_main", "SWITCH_COLUMNS"]
