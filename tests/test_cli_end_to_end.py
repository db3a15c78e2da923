"""The command line end to end on the tiny CPU config: train a few steps, then restore and
evaluate with the checkpoint the run wrote, with no --preset/--mode (the checkpoint says)."""
import json
from pathlib import Path

import torch

from varformer import cli
from varformer.restoration import save_image

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_train_restore_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(CONFIGS / "tiny_cpu.yml"), "--out", str(run),
                     "train.total_steps=1", "train.val_every=0"]) == 0
    ckpts = sorted(p for p in run.rglob("latest"))
    assert ckpts, "the run wrote no checkpoint pointer"
    info = json.loads(ckpts[0].read_text())
    weights = ckpts[0].parent / info["ema"]
    assert weights.is_file()

    g = torch.Generator().manual_seed(0)
    images = tmp_path / "gt"
    images.mkdir()
    for i in range(2):
        save_image(torch.rand(3, 40, 56, generator=g), images / f"im{i}.png")
    out = tmp_path / "restored"
    assert cli.main(["restore", str(images), "-o", str(out), "--weights", str(weights),
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["im0.png", "im1.png"]

    cfg = tmp_path / "eval.yml"
    cfg.write_text(f"root: {tmp_path}\nsets:\n  - task: identity\n    name: tiny\n"
                   f"    lq: gt\n    gt: gt\n")
    res = tmp_path / "results"
    assert cli.main(["eval", str(cfg), "--weights", str(weights), "--protocol", "resize",
                     "--out", str(res), "--device", "cpu"]) == 0
    table = (res / "results.md").read_text()
    assert "tiny" in table and "PSNR" in table and "mode paper" in table
