"""The paper's analyses as tools (``varformer analyze ...``), on released or own weights:

- ``scales`` (``varformer.analysis.scales``): Eq. 2 / Fig. 2 (c-d), decode the VQVAE latent of
  a degraded image with the scales of a set C replaced by the VAR predictions;
- ``tsne`` (``varformer.analysis.tsne``): Fig. 3, t-SNE of the VQVAE and VAR latents of clean
  and degraded images;
- ``dae`` (``varformer.analysis.dae``): Fig. 7, the DAE fusion weights per level.

All take ``--weights`` (loaded with ``VarFormer.from_pretrained`` as ``varformer restore``
does; a ``varformer train`` run folder means its latest EMA checkpoint) or, to try a tool
out, ``--random-init`` (an untrained ``--preset small`` model), and write under ``--out``.
Images are resized to the model's 256x256.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .common import VAR_INPUTS, UsageError


def _parser() -> argparse.ArgumentParser:
    from . import dae, scales, tsne

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and output")
    g.add_argument("--weights", metavar="FILE",
                   help="VarFormer weights: the released net_g_last.pth (Hugging Face repo "
                        "wsy541/VarFormer), a varformer train checkpoint, or a run folder")
    g.add_argument("--random-init", action="store_true",
                   help="no weights: an untrained model (default --preset small), to try the "
                        "tool out; its pictures mean nothing")
    g.add_argument("--preset", choices=["full", "small"],
                   help="model size (default: the checkpoint's, else full)")
    g.add_argument("--mode", choices=["official", "paper"],
                   help="model variant (default: the checkpoint's, else official)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    g.add_argument("--var-input", choices=VAR_INPUTS, default="adapter",
                   help="what the VAR branch is fed: the adapter's latent as the model runs "
                        "(default), or the VQVAE encoder latent (paper Sec. 3.1)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of --random-init and of t-SNE (default 0)")
    ap = argparse.ArgumentParser(prog="varformer analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="tool", required=True, metavar="{scales,tsne,dae}")

    class _Sub:                       # gives every tool the common options
        def add_parser(self, name, **kw):
            return sub.add_parser(name, parents=[common], **kw)
    for mod in (scales, tsne, dae):
        mod.add_parser(_Sub())
    return ap


def analyze_main(argv: Optional[Sequence[str]] = None, *, _model=None) -> int:
    """``varformer analyze scales|tsne|dae ...``; returns the exit status (2: usage errors,
    printed as one line). ``_model`` (tests): a model to use instead of loading one."""
    args = _parser().parse_args(argv)

    def fail(msg) -> int:
        print(f"varformer analyze {args.tool}: {msg}", file=sys.stderr)
        return 2

    if _model is None and not args.weights and not args.random_init:
        from .common import WEIGHTS_HELP
        return fail(f"no weights: {WEIGHTS_HELP}")
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but torch sees no CUDA device")
    try:
        if _model is not None:
            model = _model.to(args.device).eval()
        else:
            from .common import load_model
            model = load_model(args.weights, mode=args.mode, preset=args.preset,
                               device=args.device, random_init=args.random_init, seed=args.seed)
        return args.run(args, model)
    except UsageError as e:
        return fail(str(e))
    except (KeyError, FileNotFoundError) as e:     # weights that do not fit, missing files
        return fail(str(e.args[0]) if e.args else str(e))


__all__ = ["analyze_main", "UsageError"]
