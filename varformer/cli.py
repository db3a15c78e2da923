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

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("varformer bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    ops = [args.op] if args.op else list(OPS)
    for op in ops:
        if op not in OPS:
            print(f"varformer bench: unknown --op {op!r}; choose from {', '.join(OPS)}",
                  file=sys.stderr)
            return 2
    dtypes = None
    if args.dtype:
        dtypes = [getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
                          .get(x, x)) for x in args.dtype.split(",")]
    command = "varformer " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("varformer") \
        else "varformer bench " + " ".join(a for a in (args.op and f"--op {args.op}",
                                                        f"--device {device}",
                                                        args.quick and "--quick") if a)
    meta = harness.metadata(device, command)
    print(f"# varformer bench — {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"{meta['date']}")
    all_rows = []
    for op in ops:
        mod = importlib.import_module(OPS[op])
        rows = []
        csv_path = os.path.join(args.out, f"{op}_{device}.csv") if args.out else None
        if csv_path:
            os.makedirs(args.out, exist_ok=True)
            if os.path.exists(csv_path):
                os.remove(csv_path)
        for case in mod.cases(device, quick=args.quick, dtypes=dtypes):
            case_rows = harness.run_case(case, device, quick=args.quick,
                                         log=(lambda s: print(s, file=sys.stderr)))
            if csv_path:  # written per shape, so an interrupted run keeps what it measured
                harness.write_csv(case_rows, csv_path, meta)
            rows += case_rows
        all_rows += rows
        if args.out:
            harness.plot(rows, os.path.join(args.out, f"{op}_{device}.png"))
    table = harness.markdown(all_rows)
    print(table)
    if args.out:
        with open(os.path.join(args.out, f"bench_{device}.md"), "w") as f:
            f.write(f"# varformer bench\n\n- date: {meta['date']}\n- device: {meta['device']}\n"
                    f"- torch {meta['torch']}, triton {meta['triton']}\n- command: "
                    f"`{meta['command']}`\n\n{table}\n")
    return 0


WEIGHTS_HELP = ("the released VarFormer checkpoint (net_g_last.pth) cannot be bundled with this "
                "package: download it from the Hugging Face repo wsy541/VarFormer and point "
                "--weights to the downloaded file")


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
    if not os.path.isfile(args.weights):
        return fail(f"weights file {args.weights!r} not found; {WEIGHTS_HELP}")
    try:
        files = _restore_inputs(args.inputs)
        targets = _restore_outputs(args.inputs, files, args.output)
    except ValueError as e:
        return fail(str(e))

    import torch
    from varformer.restoration import check_options, load_image, restore, save_image

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

    model = VarFormer.from_pretrained(args.weights, mode=args.mode, preset=args.preset)
    model = model.to(device).eval()
    failed = 0
    for src, dst in zip(files, targets):
        try:
            image = load_image(src)
        except OSError as e:
            print(f"varformer restore: skipping {src!r}: {e}", file=sys.stderr)
            failed += 1
            continue
        out = restore(model, image, tile=args.tile, overlap=args.tile_overlap,
                      batch_size=args.batch_size, mode=mode, device=device)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        save_image(out, dst)
        print(f"{src} -> {dst}")
    return 1 if failed else 0


def _delegate(argv):
    """train / eval / data check parse their own options (``varformer train --help`` etc.)."""
    if argv[:1] == ["train"]:
        from varformer.train import train_main
        return train_main(argv[1:])
    if argv[:1] == ["eval"]:
        from varformer.eval import eval_main
        return eval_main(argv[1:])
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
    d = sub.add_parser("data", help="dataset tools: varformer data check CONFIG")
    d.add_argument("action", choices=["check"])
    b = sub.add_parser("bench", help="benchmark the fused ops against eager PyTorch")
    b.add_argument("--op", help=f"one of: {', '.join(OPS)} (default: all)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    b.add_argument("--dtype", help="comma list of bf16,fp16,fp32 (default: bf16,fp32 on cuda, "
                                   "fp32 on cpu)")
    b.add_argument("--out", help="folder for CSV, markdown and plots")
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
                   help="checkpoint net_g_last.pth from the Hugging Face repo wsy541/VarFormer")
    r.add_argument("--mode", choices=["official", "paper"], default="official",
                   help="model variant passed to VarFormer.from_pretrained (default official)")
    r.add_argument("--preset", choices=["full", "small"], default="full",
                   help="model size of the weights: full (released) or small (VarFormer.small)")
    r.add_argument("--tile", type=int, default=256, help="tile size (default 256)")
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
