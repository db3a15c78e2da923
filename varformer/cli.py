"""Command line: ``varformer bench`` and ``varformer restore`` (and ``python -m varformer``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

OPS = {"mediator_attention": "varformer.benchmarks.bench_mediator_attention",
       "window_attention": "varformer.benchmarks.bench_window_attention",
       "vq": "varformer.benchmarks.bench_vq",
       "model": "varformer.benchmarks.bench_model"}


DEFAULT_CPU_ROUNDS = 3     # interleaved timing rounds per CPU measurement (--rounds)


def _bench_command(args, device: str, smoke: bool) -> str:
    """The command line that reproduces this run."""
    from varformer.benchmarks import harness
    parts = harness.isa_limits().split()          # ISA-narrowing variables, when set
    parts += ["VARFORMER_BENCH_SMOKE=1"] if smoke else []
    parts += ["varformer", "bench"]
    for flag, val in (("--op", args.op), ("--device", device), ("--dtype", args.dtype),
                      ("--threads", args.threads), ("--load", args.load or None),
                      ("--rounds", args.rounds),
                      ("--out", args.out)):
        if val is not None:
            parts += [flag, str(val)]
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def _bench(args) -> int:
    import torch

    if args.compile_report:
        from varformer import compile_check
        rows = compile_check.run(archs=tuple(int(a) for a in args.archs.split(",")))
        text = compile_check.report(rows)
        print(text)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "compile_report.md"), "w") as f:
                f.write(text + "\n")
        return 0 if all(r["ok"] for r in rows) else 1

    from varformer.benchmarks import harness
    harness.isolate_inductor_cache()    # compiled baselines under ATEN_CPU_CAPABILITY

    def fail(msg):
        print(f"varformer bench: {msg}", file=sys.stderr)
        return 2

    if args.threads is not None:
        if args.threads < 1:
            return fail(f"--threads must be at least 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # for OpenMP runtimes loaded later
        torch.set_num_threads(args.threads)
    if args.load < 0:
        return fail(f"--load must be 0 or more busy processes, got {args.load}")
    if args.rounds is not None and args.rounds < 1:
        return fail(f"--rounds must be at least 1, got {args.rounds}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but torch sees no CUDA device")
    ops = [o.strip() for o in args.op.split(",") if o.strip()] if args.op else list(OPS)
    for op in ops:
        if op not in OPS:
            return fail(f"unknown --op {op!r}; choose from {', '.join(OPS)}")
    dtypes = None
    if args.dtype:
        names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        dtypes = []
        for x in args.dtype.split(","):
            dt = getattr(torch, names.get(x.strip(), x.strip()), None)
            if not isinstance(dt, torch.dtype):
                return fail(f"--dtype expects a comma list of bf16, fp16, fp32; got {x!r}")
            dtypes.append(dt)
    smoke = harness.smoke()
    quick = args.quick or smoke
    state = {"op": None, "log": None, "total": None}
    try:
        return _bench_run(args, harness, device, ops, dtypes, smoke, quick, state)
    except KeyboardInterrupt:
        if state["log"] is not None:
            state["log"].close()
        where = f" during {state['op']}" if state["op"] else ""
        done = (f" after {state['log'].i} of {state['total']} measurements"
                if state["log"] is not None else "")
        print(f"varformer bench: interrupted{where}{done}"
              + (f"; finished ops are in {args.out}" if args.out and state["log"] else ""),
              file=sys.stderr)
        return 130


def _bench_run(args, harness, device, ops, dtypes, smoke, quick, state) -> int:
    """Build every case, then measure op by op under the background load; ``state`` tells an
    interrupt handler how far it got."""
    import torch

    plan = []
    for op in ops:
        cases = list(importlib.import_module(OPS[op]).cases(device, quick=quick, dtypes=dtypes))
        if smoke:   # one case per op name (a module may bench several ops)
            seen = set()
            cases = [c for c in cases if not (c.op in seen or seen.add(c.op))]
        plan.append((op, cases))
    total = state["total"] = sum(c.n_measurements() for _, cases in plan for c in cases)

    # The CPU's FMA peak (and on CPU the copy bandwidth) are measured once and cached: here,
    # before the background load starts, so that % of peak under load is against the quiet
    # machine's ceilings.
    harness.measured_fma_peak_gflops(torch.get_num_threads())
    if device != "cuda":
        harness.cpu_peaks()
    with harness.BackgroundLoad(args.load, torch.get_num_threads()) as load:
        meter = harness.LoadMeter()
        meta = harness.metadata(device, _bench_command(args, device, smoke), load)
        rounds = 1 if device == "cuda" or smoke else (DEFAULT_CPU_ROUNDS if args.rounds is None
                                                      else args.rounds)
        # on a loaded machine a call's time has a long tail: compare throughput (mean times)
        stat = "mean" if args.load and device != "cuda" else "median"
        meta["timing"] = harness.timing_line(device, rounds, quick, smoke, stat)
        head = ["# varformer bench", ""] + harness.metadata_lines(meta)
        widths = harness.line_widths(c for _, cases in plan for c in cases)
        # set before the header is printed: an interrupt from then on names where it stopped
        log = state["log"] = harness.Log(total, desc="varformer bench", widths=widths)
        state["op"] = plan[0][0] if plan else None
        print("\n".join(head), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        md_path = os.path.join(args.out, f"bench_{device}.md") if args.out else None
        sections = []
        try:
            for op, cases in plan:
                state["op"] = op
                log.header(f"## {op}: {len(cases)} shape{'s' if len(cases) != 1 else ''}, "
                           f"{sum(c.n_measurements() for c in cases)} measurements")
                csv_path = os.path.join(args.out, f"{op}_{device}.csv") if args.out else None
                if csv_path and os.path.exists(csv_path):
                    os.remove(csv_path)
                rows = []
                for case in cases:
                    case_rows = harness.run_case(case, device, quick=quick, rounds=rounds,
                                                 log=log.measurement, widths=widths, stat=stat)
                    if csv_path:  # written per shape: an interrupted run keeps what it measured
                        meta["loadavg"] = "{:.2f} {:.2f} {:.2f}".format(*harness.loadavg())
                        harness.write_csv(case_rows, csv_path, meta)
                    rows += case_rows
                text = "\n".join([f"## {op}", "", harness.markdown(rows, device), ""]
                                 + harness.summary(rows))
                sections.append(text)
                log.write("")   # the bar ends above the table
                print("\n" + text, flush=True)
                if args.out and rows:
                    harness.plot(rows, os.path.join(args.out, f"{op}_{device}.png"), device,
                                 meta["device"] + ("" if meta["load"] == "none"
                                                   else f", {meta['load']}"), stat)
                if md_path:     # rewritten after each op: an interrupted run keeps those done
                    with open(md_path, "w") as f:
                        f.write("\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n")
        finally:
            log.close()
        footer = f"- machine load during the run: {meter.describe()}"
        print("\n" + footer)
    if md_path:
        with open(md_path, "w") as f:
            f.write("\n".join(head) + "\n" + footer + "\n\n" + "\n\n".join(sections) + "\n")
    return 0


WEIGHTS_HELP = ("the released VarFormer checkpoint (net_g_last.pth) cannot be bundled with this "
                "package: download it from the Hugging Face repo wsy541/VarFormer and point "
                "--weights to the downloaded file")


def resolve_weights(path: str) -> str:
    """``--weights``: a file as it is; a training run folder (``runs/tiny``) or its
    ``checkpoints`` folder -> the EMA weights of its latest checkpoint."""
    if not os.path.isdir(path):
        return path
    import json
    for folder in (os.path.join(path, "checkpoints"), path):
        pointer = os.path.join(folder, "latest")
        if os.path.isfile(pointer):
            with open(pointer) as f:
                return os.path.join(folder, json.load(f)["ema"])
    raise ValueError(f"--weights {path!r} is a folder without a checkpoint ('latest' pointer "
                     f"in it or in its checkpoints/ folder); give a weights file or a run folder")


def weights_error(path, exc: BaseException) -> str:
    """One line for a weights file that could not be loaded (``--weights``)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 600:
        text = text[:600] + " …"
    hint = "" if "--preset" in text else " (check --weights, --preset and --mode)"
    return f"cannot load --weights {path!r}: {text}{hint}"


def _restore_inputs(paths) -> list[str]:
    """Image files named by the command line; a folder contributes the images directly in it."""
    from varformer.restoration import IMAGE_EXTENSIONS

    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(path, n)))
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path!r}")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"input {path!r} does not exist")
    return files


def _restore_outputs(inputs, files, out) -> list[str]:
    """Output path per input file: ``out`` itself for one input file and an image-file ``out``,
    else ``out``/<input name>.png."""
    from varformer.restoration import IMAGE_EXTENSIONS

    if out.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(out):
        if len(files) != 1 or os.path.isdir(inputs[0]):
            raise ValueError(f"-o {out!r} is a file name, but {len(files)} images are to be "
                             f"restored; give a folder")
        return [out]
    targets = [os.path.join(out, os.path.splitext(os.path.basename(f))[0] + ".png")
               for f in files]
    seen = {}
    for src, dst in zip(files, targets):
        if dst in seen:
            raise ValueError(f"{seen[dst]!r} and {src!r} would both be written to {dst!r}")
        seen[dst] = src
    return targets


def _restore(args) -> int:
    def fail(message):
        print(f"varformer restore: {message}", file=sys.stderr)
        return 2

    # checked before anything imports torch or builds a model
    if not args.weights:
        return fail(f"--weights FILE is required; {WEIGHTS_HELP}")
    try:
        args.weights = resolve_weights(args.weights)
    except (ValueError, OSError, KeyError) as e:
        return fail(str(e))
    if not os.path.isfile(args.weights):
        return fail(f"weights file {args.weights!r} not found; {WEIGHTS_HELP}")
    try:
        files = _restore_inputs(args.inputs)
        targets = _restore_outputs(args.inputs, files, args.output)
    except ValueError as e:
        return fail(str(e))

    import torch
    from varformer._progress import Progress
    from varformer.restoration import (check_options, count_tiles, read_image_file, restore,
                                       save_image)

    mode = "resize" if args.resize else "tiled"
    try:
        check_options(args.tile, args.tile_overlap, args.batch_size, mode)
    except ValueError as e:
        return fail(f"{e} (see --tile, --tile-overlap, --batch-size)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but torch sees no CUDA device")
    try:
        from varformer.models import VarFormer
    except Exception as e:  # the model is optional in this version
        return fail(f"the VarFormer model is not available in this version ({e})")

    try:
        model = VarFormer.from_pretrained(args.weights, mode=args.mode, preset=args.preset)
    except Exception as e:  # mismatch, foreign or corrupt file: one line, no traceback
        return fail(weights_error(args.weights, e))
    served = served_tile(model)
    if served is not None and args.tile != served:
        return fail(f"--tile {args.tile}: VarFormer works on {served}x{served} tiles only (its "
                    f"VAR prior is a {served // 16}x{served // 16} latent of 16-pixel "
                    f"patches); keep --tile {served} and tune --tile-overlap (0-{served - 1}) "
                    f"instead; images of any size are tiled or padded to it")
    model = model.to(device).eval()
    failed = 0
    for k, (src, dst) in enumerate(zip(files, targets), 1):
        try:
            image = read_image_file(src)
        except OSError as e:
            print(f"varformer restore: skipping {src!r}: {e}", file=sys.stderr)
            failed += 1
            continue
        h, w = image.rgb.shape[-2:]
        bar = Progress(count_tiles(h, w, args.tile, args.tile_overlap, mode),
                       f"[{k}/{len(files)}] {os.path.basename(src)} tiles")
        try:
            out = restore(model, image.rgb, tile=args.tile, overlap=args.tile_overlap,
                          batch_size=args.batch_size, mode=mode, device=device,
                          progress=bar.update)
        finally:
            bar.close()
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        notes = save_image(out, dst, alpha=image.alpha, bits=image.bits, gray=image.gray,
                           icc=image.icc)
        for note in notes:
            print(f"varformer restore: {dst}: {note}", file=sys.stderr)
        print(f"{src} -> {dst}")
    return 1 if failed else 0


def served_tile(model):
    """The only input size ``model`` takes (256 for VarFormer: VAR's 16x16 latent), or None for
    other models (they take any tile)."""
    size = getattr(model, "input_size", None)
    if size is None and type(model).__name__ == "VarFormer":
        size = 256
    return size


def _delegate(argv):
    """train / eval / data check parse their own options (``varformer train --help`` etc.)."""
    if argv[:1] == ["train"]:
        from varformer.train import train_main
        return train_main(argv[1:])
    if argv[:1] == ["eval"]:
        from varformer.eval import eval_main
        return eval_main(argv[1:])
    if argv[:1] == ["analyze"]:
        from varformer.analysis import analyze_main
        return analyze_main(argv[1:])
    if argv[:1] == ["data"]:
        from varformer.data.check import data_main
        return data_main(argv[1:])
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    delegated = _delegate(argv)
    if delegated is not None:
        return delegated
    ap = argparse.ArgumentParser(prog="varformer", description="varformer command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train VarFormer (stage 1 or 2) from a YAML config; "
                                 "varformer train --help")
    sub.add_parser("eval", help="evaluate weights on test sets (PSNR/SSIM/LPIPS tables); "
                                "varformer eval --help")
    sub.add_parser("analyze", help="the paper's analyses: scales (Eq. 2), tsne (Fig. 3), dae "
                                   "(Fig. 7); varformer analyze --help")
    d = sub.add_parser("data", help="dataset tools: varformer data check CONFIG")
    d.add_argument("action", choices=["check"])
    b = sub.add_parser(
        "bench", help="benchmark the fused ops against eager PyTorch",
        description="Benchmark the fused ops (and the model) against eager PyTorch: per shape, "
                    "mode and implementation the median time, peak memory and speed-up, then a "
                    "one-line summary per op. Numbered lines and a progress bar go to stderr, "
                    "the tables (with CPU model, ISA, threads, load, versions, date and the "
                    "command) to stdout.",
        epilog="Environment: VARFORMER_BENCH_SMOKE=1 runs one tiny case per op with a single "
               "repetition and without torch.compile providers (implies --quick; for "
               "end-to-end tests, not for numbers).")
    b.add_argument("--op", help=f"one of, or a comma list of: {', '.join(OPS)} (default: all)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    b.add_argument("--quick", action="store_true",
                   help="a few shapes and about 1 s of repetitions per measurement (a few "
                        "minutes for all ops on a 2-core CPU); without it: the full set of "
                        "shapes and implementations, 5 s per measurement")
    b.add_argument("--dtype", help="comma list of bf16,fp16,fp32 (default: bf16,fp32 on cuda, "
                                   "fp32 on cpu)")
    b.add_argument("--threads", type=int, metavar="N",
                   help="torch / OpenMP threads (default: torch's default)")
    b.add_argument("--load", type=int, default=0, metavar="N",
                   help="run N background busy processes for the whole run, each with as many "
                        "busy threads as the benchmark uses (hashing in a loop): reproduces an "
                        "oversubscribed machine; they are killed when the run ends. CPU "
                        "speed-ups are then ratios of mean times (throughput), each round using "
                        "its whole time budget, since a loaded machine's times have long tails")
    b.add_argument("--rounds", type=int, metavar="R",
                   help="CPU: time the implementations of a shape in R interleaved rounds "
                        "(rotated order; speed-up = median of the per-round ratios), so that a "
                        "shared machine whose speed drifts slows both sides of a ratio alike; "
                        f"1 = one implementation after the other (default {DEFAULT_CPU_ROUNDS}; "
                        "CUDA: always 1)")
    b.add_argument("--out", help="folder for CSV, markdown and plots (one PNG per op)")
    b.add_argument("--compile-report", action="store_true",
                   help="compile every Triton kernel for sm_90a/sm_80 ahead of time and print "
                        "registers, spills and shared memory per kernel and config")
    b.add_argument("--archs", default="90,80", help="with --compile-report (default 90,80)")
    r = sub.add_parser("restore", help="restore images of any size with a VarFormer checkpoint",
                       description="Restore images with VarFormer, tile by tile at full "
                                   "resolution (or --resize: the official 256x256 protocol).")
    r.add_argument("inputs", nargs="+", metavar="IN",
                   help="image files or folders (their .png/.jpg/.jpeg/.bmp/.tif files)")
    r.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder (created; images saved as <name>.png), or for a single "
                        "input image a file name with an image extension")
    r.add_argument("--weights", metavar="FILE",
                   help="checkpoint net_g_last.pth from the Hugging Face repo wsy541/VarFormer, "
                        "a .safetensors file of varformer train, or its run folder (latest "
                        "EMA weights)")
    r.add_argument("--mode", choices=["official", "paper"], default=None,
                   help="model variant (default: what the checkpoint's metadata says, as "
                        "written by varformer train; official for the released weights)")
    r.add_argument("--preset", choices=["full", "small"], default=None,
                   help="model size: full (released) or small (VarFormer.small); default: the "
                        "checkpoint's metadata, else full")
    r.add_argument("--tile", type=int, default=256,
                   help="tile size; VarFormer takes 256 only (default 256)")
    r.add_argument("--tile-overlap", type=int, default=32,
                   help="overlap of neighbouring tiles in pixels (default 32)")
    r.add_argument("--resize", action="store_true",
                   help="resize to --tile x --tile and back instead of tiling (the official "
                        "protocol at the default 256)")
    r.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    r.add_argument("--batch-size", type=int, default=8, help="tiles per model call (default 8)")
    args = ap.parse_args(argv)
    if args.cmd == "bench":
        return _bench(args)
    if args.cmd == "restore":
        return _restore(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
