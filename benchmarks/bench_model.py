"""The VarFormer model end to end: fused kernels vs every op on its PyTorch reference.

CUDA: the released-size model (VAR d16, ch 160, official mode, random weights) at B = 1,
256×256, inference under bf16 autocast; and a paper-mode training step (L1 + adapter latent
loss, backward) at B = 2 (quick) / 4 and 8, bf16 autocast, the fused run with activation
checkpointing of the 128²/64² prior modules. CPU: the small preset (ch 32, VAR depth 2),
inference at B = 1 and (not with ``--quick``) a training step at B = 1, fp32.

Each case is one row per provider: "fused" (the default dispatch: fused CPU/Triton paths) and
"eager (reference ops)" (every varformer op on its plain PyTorch reference); the speed-up column
is reference time / fused time. The shape column names the mode: "inference" (official mode,
no gradient) or "training step" (paper mode, forward + loss + backward).

Run: ``varformer bench --op model [--device cuda] [--quick]``.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from varformer.benchmarks.harness import Case, Provider, smoke
from varformer.models import VarFormer


def _model(device, size, mode, fused, checkpoint):
    torch.manual_seed(0)
    m = (VarFormer.small(mode) if size == "small" else VarFormer(mode=mode)).to(device)
    m.use_fused_kernels = fused
    if checkpoint:
        m.set_checkpointing((1, 2))
    return m


def _autocast(device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
            else contextlib.nullcontext())


def inference_case(device, size, B) -> Case:
    def mk(fused):
        def make(mode):
            m = _model(device, size, "official", fused, False).eval()
            m.requires_grad_(False)
            lq = torch.rand(B, 3, 256, 256, device=device) * 2 - 1

            def run():
                with torch.no_grad(), _autocast(device):
                    return m(lq)
            return run, None
        return make
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    provs = [Provider("eager (reference ops)", dt, mk(False), baseline=True),
             Provider("fused", dt, mk(True))]
    return Case("model", f"{size} inference (official) B={B}", lambda m: float("nan"),
                lambda m, d: float("nan"), provs, modes=("fwd",))


def training_case(device, size, B) -> Case:
    def mk(fused):
        def make(mode):
            m = _model(device, size, "paper", fused, fused and device == "cuda").train()
            m.requires_grad_(True)
            lq = torch.rand(B, 3, 256, 256, device=device) * 2 - 1
            gt = torch.rand(B, 3, 256, 256, device=device) * 2 - 1
            params = [p for p in m.parameters() if p.requires_grad]

            def step():
                with _autocast(device):
                    out, lq_feat, _ = m(lq, return_all=True)
                    loss = F.l1_loss(out.float(), gt) + 0.5 * lq_feat.float().square().mean()
                loss.backward()
            return step, params
        return make
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    provs = [Provider("eager (reference ops)", dt, mk(False), baseline=True),
             Provider("fused" + (" + checkpointing" if device == "cuda" else ""), dt, mk(True))]
    return Case("model", f"{size} training step (paper) B={B}", lambda m: float("nan"),
                lambda m, d: float("nan"), provs, modes=("fwd+bwd",))


def cases(device: str, quick: bool = False, dtypes=None) -> list[Case]:
    if smoke():                          # VARFORMER_BENCH_SMOKE=1: inference only
        return [inference_case(device, "released" if device == "cuda" else "small", 1)]
    if device == "cuda":
        train_bs = [2] if quick else [4, 8]
        return [inference_case(device, "released", 1)] + [training_case(device, "released", b)
                                                          for b in train_bs]
    # --quick: inference only (the CLI test runs it); the full run adds the training step
    return [inference_case(device, "small", 1)] + ([] if quick else
                                                   [training_case(device, "small", 1)])


if __name__ == "__main__":
    from varformer.cli import main
    sys.exit(main(["bench", "--op", "model"] + sys.argv[1:]))
