"""Table-5 ablation switches: which keys each variant lacks (against rules written from the
full model's key tree), strict loading, what each switched-off module is replaced by (a variant
equals the full model with that module neutralised), configs and a tiny training run."""
import pytest
import torch

from varformer.models.varformer import (ABLATION_SWITCHES, TABLE5_VARIANTS, VarFormer,
                                        resolve_ablation, table5_letter)


def _expected_missing(full_keys, sw):
    """Keys of the full model that a variant with switches ``sw`` must not have."""
    out = set()
    for k in full_keys:
        parts = k.split(".")
        if not sw["skip"] and k == "main_decoder.theta":
            out.add(k)
        if not sw["adapter"] and parts[0] == "ft_layers":
            out.add(k)
        if parts[0] in ("Mainencoder", "main_decoder") and len(parts) > 3:
            mod = parts[1]
            if not sw["aft"] and mod == "AFT":
                out.add(k)
            if not sw["dae"]:
                if mod in ("DAE", "cat_rec_syn_bf", "cat_rec_syn_bf_nm"):
                    out.add(k)
                # without DAE the weight predictor's own parts go; its projection head M stays
                # while AFT needs the prior
                if mod == "cat_rec_syn" and (not sw["aft"] or parts[3] in ("swin_blocks",
                                                                            "conv1x1")):
                    out.add(k)
    return out


def test_resolve_ablation():
    assert resolve_ablation(None) == dict.fromkeys(ABLATION_SWITCHES, True)
    assert resolve_ablation("E") == TABLE5_VARIANTS["e"]
    assert resolve_ablation({"dae": False}) == dict(skip=True, adapter=True, aft=True, dae=False)
    assert table5_letter({"skip": False}) == "b" and table5_letter({"dae": False}) is None
    assert table5_letter(None) == "f"
    with pytest.raises(ValueError, match="unknown switches.*'daee'"):
        resolve_ablation({"daee": False})
    with pytest.raises(TypeError, match="'aft' must be true or false"):
        resolve_ablation({"aft": 0})
    with pytest.raises(ValueError, match="Table-5 variant"):
        resolve_ablation("g")
    with pytest.raises(TypeError, match="ablation"):
        resolve_ablation(3)
    with pytest.raises(ValueError, match="unknown switches"):
        VarFormer.small(ablation={"mixup": False})


@pytest.mark.parametrize("mode", ["official", "paper"])
@pytest.mark.parametrize("variant", sorted(TABLE5_VARIANTS) + ["dae_only_off"])
def test_variant_state_dict_lacks_exactly_the_switched_off_modules(variant, mode):
    sw = resolve_ablation({"dae": False} if variant == "dae_only_off" else variant)
    with torch.device("meta"):
        full = VarFormer.small(mode).state_dict()
        m = VarFormer.small(mode, ablation=sw)
    sd = m.state_dict()
    assert m.ablation == sw
    missing = set(full) - set(sd)
    assert missing == _expected_missing(full, sw)
    assert set(sd) <= set(full)                          # nothing new
    assert all(sd[k].shape == full[k].shape for k in sd)
    if any(not v for v in sw.values()):
        assert missing


def test_released_size_variant_keys():
    with torch.device("meta"):
        full = VarFormer().state_dict()
        e = VarFormer(ablation="e").state_dict()
    assert set(full) - set(e) == _expected_missing(full, TABLE5_VARIANTS["e"])


def test_variant_checkpoint_loads_strictly_and_mismatches_are_errors(tmp_path):
    torch.manual_seed(3)
    e = VarFormer.small("paper", ablation="e")
    path = tmp_path / "e.pth"
    torch.save({"params_ema": e.state_dict()}, path)
    again = VarFormer.from_pretrained(str(path), mode="paper", preset="small", ablation="e")
    assert again.ablation == TABLE5_VARIANTS["e"]
    loaded = again.state_dict()
    for k, v in e.state_dict().items():
        assert torch.equal(loaded[k], v), k
    fresh = VarFormer.small("paper", ablation=dict(TABLE5_VARIANTS["e"]))
    fresh.load_official(e.state_dict(), strict=True)
    with pytest.raises(KeyError, match="missing"):            # full model, variant weights
        VarFormer.small("paper").load_official(e.state_dict(), strict=True)
    with pytest.raises(KeyError, match="unexpected"):         # variant, full weights
        VarFormer.small("paper", ablation="e").load_official(
            VarFormer.small("paper").state_dict(), strict=True)


# ---- what a switched-off module is replaced by ----------------------------------------------
def _neutralise(full, sw):
    """Set the full model's parameters so that each module switched off in ``sw`` does
    nothing: θ → +∞ (sigmoid 1: only the decoder feature), adapter residual gates 0 (identity),
    AFT output projection 0 (x + 0), DAE fusion w1 = 1 and uniform scale weights."""
    with torch.no_grad():
        if not sw["skip"]:
            full.main_decoder.theta.fill_(60.0)
        if not sw["adapter"]:
            for blk in full.ft_layers.blks:
                blk.beta.zero_()
                blk.gamma.zero_()
        for part in (full.Mainencoder, full.main_decoder):
            for i in range(5):
                key = f"Level_{i}"
                if not sw["aft"]:
                    part.AFT[key].proj_out.weight.zero_()
                    part.AFT[key].proj_out.bias.zero_()
                if not sw["dae"]:
                    part.DAE[key].conv1x1.weight.zero_()
                    part.DAE[key].conv1x1.bias.copy_(torch.tensor([200.0, -200.0]))
                    part.cat_rec_syn[key].conv1x1.weight.zero_()
                    part.cat_rec_syn[key].conv1x1.bias.zero_()


def _perturb(model, seed):
    """Random values for the zero-initialised parameters (adapter gates, θ), so that the
    neutralisation is what makes the two models agree."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".beta", ".gamma")) or name == "main_decoder.theta":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("mode,sw", [
    ("paper", dict(skip=False, adapter=False, aft=True, dae=False)),
    ("official", TABLE5_VARIANTS["d"]),
])
def test_switched_off_modules_equal_neutralised_full_model(mode, sw):
    torch.manual_seed(11)
    full = VarFormer.small(mode).eval()
    _perturb(full, 5)
    variant = VarFormer.small(mode, ablation=sw).eval()
    keep = set(variant.state_dict())          # once: state_dict() walks the whole model
    variant.load_state_dict({k: v for k, v in full.state_dict().items() if k in keep},
                            strict=True)
    g = torch.Generator().manual_seed(7)
    lq = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    with torch.no_grad():
        before = full(lq)
        _neutralise(full, sw)
        want, got = full(lq), variant(lq)
    assert (before - want).abs().max() > 1e-3         # the neutralised modules did something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- configs and training ---------------------------------------------------------------------
def test_config_switches():
    from varformer.train.config import load_config

    cfg = load_config("tiny_cpu")
    assert cfg["model"]["ablation"] == dict.fromkeys(ABLATION_SWITCHES, True)
    assert "ablation" not in cfg["model"]["kwargs"]
    cfg = load_config("tiny_cpu", ["model.ablation=c"])
    assert cfg["model"]["kwargs"]["ablation"] == TABLE5_VARIANTS["c"]
    cfg = load_config("tiny_cpu", ["model.ablation.skip=false", "model.ablation.aft=false"])
    assert cfg["model"]["ablation"] == dict(skip=False, adapter=True, aft=False, dae=True)
    assert cfg["model"]["kwargs"]["ablation"] == cfg["model"]["ablation"]
    with pytest.raises(KeyError, match="model.ablation.mixup"):
        load_config("tiny_cpu", ["model.ablation.mixup=false"])
    with pytest.raises(ValueError, match="must be true or false"):
        load_config("tiny_cpu", ["model.ablation.dae=maybe"])
    with pytest.raises(ValueError, match="disagree"):
        load_config("tiny_cpu", ["model.ablation=c", "model.kwargs.ablation=e"])
    cfg = load_config("ablation_stage2")
    assert cfg["model"]["ablation"] == TABLE5_VARIANTS["f"] and cfg["stage"] == 2
    for mode in ("official", "paper"):
        for letter in TABLE5_VARIANTS:
            c = load_config("ablation_stage2", [f"model.ablation={letter}",
                                                f"model.mode={mode}"])
            assert c["model"]["ablation"] == TABLE5_VARIANTS[letter]


def test_tiny_ablation_training_run(tmp_path):
    from varformer.train.checkpoint import load_safetensors
    from varformer.train.config import load_config
    from varformer.train.trainer import Trainer

    cfg = load_config("tiny_cpu", ["model.ablation=e", "train.total_steps=1",
                                   "train.ckpt_every=1", "train.val_every=0"])
    trainer = Trainer(cfg, str(tmp_path / "run"))
    records = trainer.train()
    assert len(records) == 1 and torch.isfinite(torch.tensor(records[0]["loss"]))
    assert "ft_layers" not in trainer.trainable
    info = trainer.ckpt.latest()
    sd = load_safetensors(info["ema"])
    assert not any(k.startswith("ft_layers.") or ".AFT." in k for k in sd)
    kw = cfg["model"]["kwargs"]
    assert kw["ablation"] == TABLE5_VARIANTS["e"]
    model = VarFormer.small("paper", **kw)
    model.load_official(sd, strict=True)
    loaded = VarFormer.from_pretrained(info["ema"])          # switches from the checkpoint
    assert loaded.ablation == TABLE5_VARIANTS["e"] and loaded.mode == "paper"

    # varformer eval --table5 on the run folder and on its checkpoint file
    import numpy as np
    from PIL import Image

    from varformer.eval.runner import eval_main, evaluate
    rng = np.random.default_rng(0)
    for sub in ("lq", "gt"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    gt = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(gt).save(tmp_path / "data" / "gt" / "a.png")
    Image.fromarray(np.clip(gt * 0.5 + 20, 0, 255).astype(np.uint8)).save(
        tmp_path / "data" / "lq" / "a.png")
    (tmp_path / "eval.yml").write_text("root: data\nsets:\n  - {task: t, name: s, lq: lq, "
                                       "gt: gt}\n")
    out = tmp_path / "t5"
    rc = eval_main([str(tmp_path / "eval.yml"), "--table5", str(tmp_path / "run"), info["ema"],
                    "--protocol", "resize", "--out", str(out)])
    assert rc == 0
    lines = (out / "table5.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and all(",e," in ln and ",paper,true,false,false,true," in ln
                                   for ln in lines[1:])
    want = [r for r in evaluate(loaded, [("t", "s", str(tmp_path / "data" / "lq"),
                                          str(tmp_path / "data" / "gt"))], protocol="resize")
            if r["image"] is None][0]
    assert abs(float(lines[1].split(",")[8]) - want["psnr"]) < 1e-4
    assert "| e |" in (out / "table5.md").read_text()


# ---- Table 5 ----------------------------------------------------------------------------------
def test_table5_averages_tasks_then_runs():
    from varformer.eval.table5 import format_table5, task_average

    def row(task, name, p, s, image=None):
        return dict(protocol="resize", task=task, set=name, image=image, psnr=p, ssim=s)
    rows = [row("derain", "A", 29.0, 0.8, image="x.png"), row("derain", "A", 30.0, 0.9),
            row("derain", "B", 32.0, 0.7), row("denoise", "C (σ=15)", 20.0, 0.5),
            dict(row("denoise", "C (σ=15)", 21.0, 0.6), protocol="tiled")]
    avg = task_average(rows)
    assert avg["resize"]["tasks"] == {"derain": (31.0, 0.8), "denoise": (20.0, 0.5)}
    assert avg["resize"]["psnr"] == pytest.approx(25.5)
    assert avg["resize"]["ssim"] == pytest.approx(0.65)
    assert avg["tiled"]["psnr"] == 21.0
    md, text = format_table5([
        {"run": "runs/x", "mode": "paper", "ablation": TABLE5_VARIANTS["c"], "results": avg},
        {"run": "runs/y", "mode": "official", "ablation": dict(TABLE5_VARIANTS["f"], aft=False,
                                                                adapter=False, skip=False),
         "results": avg}])
    assert "| c | runs/x | paper | ✓ |  | ✓ | ✓ | 25.50 | 0.650 |" in md
    assert "| – | runs/y | official |  |  |  | ✓ | 25.50 | 0.650 |" in md
    assert md.count("### Table 5") == 2
    lines = text.strip().splitlines()
    assert lines[0].startswith("protocol,exp,run,mode,skip,adapter,aft,dae,psnr,ssim,derain psnr")
    assert len(lines) == 5 and lines[1].startswith("resize,c,runs/x,paper,true,false,true,true,")
