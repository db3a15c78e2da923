"""varformer.train: losses, configs, checkpoints (atomic, retention, exact resume), DDP (2 gloo
processes), the CLI, and a few real VarFormer.small steps per stage on a fixed batch."""
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from varformer.ops.quantizer import MultiScaleQuantizer
from varformer.train import (CheckpointManager, Trainer, VGG19Features, atomic_write,
                             load_config, psnr_loss, train_main)
from varformer.train.checkpoint import load_safetensors
from varformer.train.losses import VGG19_LAYERS, VarFormerLoss, gt_targets

TINY = "tests.test_train:TinyModel"


class TinyModel(nn.Module):
    """Stand-in with VarFormer's forward signature and top-level names (fast on CPU):
    forward(lq [B,3,256,256], return_all) -> out [B,3,256,256] (, lq_feat [B,8,16,16],
    logits [B,680,32])."""

    def __init__(self, ch_mult=None):   # ch_mult: configs/tiny_cpu.yml's kwarg, unused here
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 16, 16)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.quantize = MultiScaleQuantizer(vocab_size=32, Cvae=8)
        self.ft_layers = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Linear(8, 32)
        self.Mainencoder = nn.Conv2d(3, 3, 3, 1, 1)

    def forward(self, lq, return_all=False):
        f_a = self.ft_layers(self.quant_conv(self.encoder(lq)))
        f_hat = self.quantize.quantize(f_a.detach()).f_hat
        lq_feat = f_a + (f_hat - f_a).detach()
        tokens = [nn.functional.adaptive_avg_pool2d(f_a, pn).flatten(2).transpose(1, 2)
                  for pn in self.quantize.v_patch_nums]
        logits = self.head(torch.cat(tokens, 1))
        out = (lq + 0.1 * self.Mainencoder(lq)).clamp(-1, 1)
        return (out, lq_feat, logits) if return_all else out


def tiny_cfg(**over):
    """Stage-2 config on the stand-in: synthetic data, B=1, no workers, no periodic output."""
    extra = {"model": {"factory": TINY}, "stage": 2, "seed": 3,
             "loss": {"ce": 0.1, "feat": 0.5, "l1": 1.0, "psnr": 0.5, "percep": 0.0},
             "optim": {"lr": 1e-3, "clip_grad_norm": 0.5},
             "train": {"total_steps": 6, "batch_size": 1, "accum_steps": 2, "num_workers": 0,
                       "log_every": 1000, "ckpt_every": 3, "keep_last": 2, "keep_every": 0,
                       "val_every": 0, "ema_decay": 0.9},
             "data": {"synthetic": {"n": 5, "size": 256}}}
    for k, v in over.items():
        extra.setdefault(k, {}).update(v) if isinstance(v, dict) else extra.__setitem__(k, v)
    return load_config(None, extra=extra)


# ---- losses -------------------------------------------------------------------------------------
def test_psnr_loss_formula():
    out, gt = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    mse = ((out - gt) ** 2).flatten(1).mean(1)
    want = (10 / math.log(10)) * torch.log(mse + 1e-8).mean()
    assert torch.allclose(psnr_loss(out, gt), want)
    assert psnr_loss(gt, gt) < psnr_loss(out, gt)


def test_vgg19_layout_weights_and_missing_file(tmp_path):
    vgg = VGG19Features(("relu5_4",))
    assert len(VGG19_LAYERS) == 37 and VGG19_LAYERS[35] == "relu5_4"
    assert "features.34.weight" in vgg.state_dict() and len(vgg.features) == 36
    sd = {f"features.{k}": v for k, v in VGG19Features(("relu5_4",)).features.state_dict().items()}
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(sd, path)
    loaded = VGG19Features(("relu1_2", "relu5_4"), weights=str(path))
    assert torch.equal(loaded.features[34].weight, sd["features.34.weight"])
    feats = loaded(torch.rand(1, 3, 32, 32))
    assert feats["relu1_2"].shape == (1, 64, 32, 32) and feats["relu5_4"].shape == (1, 512, 2, 2)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="vgg19-dcbb9e9d.pth"):
        VGG19Features(weights=str(tmp_path / "nope.pth"))


def test_loss_terms_and_weights():
    m = TinyModel()
    gt = torch.rand(1, 3, 256, 256) * 2 - 1
    gt_idx, f_hat = gt_targets(m, gt)
    assert gt_idx.shape == (1, 680) and f_hat.shape == (1, 8, 16, 16)
    out, lq_feat, logits = m(gt, return_all=True)
    total, terms = VarFormerLoss(ce=0.1, feat=0.5, l1=1.0)(out, lq_feat, logits, gt, gt_idx,
                                                           f_hat)
    assert set(terms) == {"ce", "feat", "l1"}
    assert torch.allclose(total, 0.1 * terms["ce"] + 0.5 * terms["feat"] + terms["l1"])
    total.backward()
    assert m.head.weight.grad is not None and m.ft_layers.weight.grad is not None


# ---- config -------------------------------------------------------------------------------------
def test_config_files_and_overrides():
    for name in ("paper_stage1", "paper_stage2", "tiny_cpu"):
        cfg = load_config(name)
        assert cfg["stage"] in (1, 2)
    cfg = load_config("tiny_cpu", ["train.total_steps=7", "optim.betas=[0.9, 0.99]",
                                   "model.fused_kernels=false", "data.synthetic.n=3"])
    assert cfg["train"]["total_steps"] == 7 and cfg["optim"]["betas"] == [0.9, 0.99]
    assert cfg["model"]["fused_kernels"] is False and cfg["data"]["synthetic"]["n"] == 3
    with pytest.raises(KeyError, match="train.totl"):
        load_config("tiny_cpu", ["train.totl=1"])


# ---- checkpoints --------------------------------------------------------------------------------
def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = str(tmp_path / "f.bin")
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"good"))

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk died")
    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert open(path, "rb").read() == b"good" and os.listdir(tmp_path) == ["f.bin"]


def test_retention(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2, keep_every=4)
    for s in range(1, 10):
        mgr.save(s, {"w": torch.full((2,), float(s))}, {"w": torch.zeros(2)}, {})
    assert mgr.steps() == [4, 8, 9] and mgr.latest()["step"] == 9
    assert load_safetensors(mgr.latest()["model"])["w"][0] == 9


def test_interrupted_checkpoint_write_keeps_last_good(tmp_path, monkeypatch):
    cfg = tiny_cfg(train={"total_steps": 4, "ckpt_every": 2})
    tr = Trainer(cfg, str(tmp_path))
    tr.train(until=2)                                   # checkpoint of step 2 written
    good = load_safetensors(tr.ckpt.latest()["model"])

    def boom(*a, **k):
        raise OSError("killed while writing")
    monkeypatch.setattr(torch, "save", boom)            # state.pt of step 4 fails midway
    with pytest.raises(OSError):
        tr.train(until=4)
    monkeypatch.undo()
    info = tr.ckpt.latest()
    assert info["step"] == 2
    assert not [f for f in os.listdir(tr.ckpt.folder) if f.endswith(".tmp")]
    back = Trainer(cfg, str(tmp_path), resume=True)
    assert back.step == 2
    loaded = back.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in good.items())


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    cfg = tiny_cfg()                        # 6 steps, accumulation 2, epochs of 5 samples
    full = Trainer(cfg, str(tmp_path / "a")).train()
    first = Trainer(cfg, str(tmp_path / "b"))
    part = first.train(until=4)            # "killed" after step 4 (last checkpoint: step 3)
    assert [r["loss"] for r in part] == [r["loss"] for r in full[:4]]
    resumed = Trainer(cfg, str(tmp_path / "b"), resume=True)
    assert resumed.step == 3
    rest = resumed.train()
    assert [r["step"] for r in rest] == [4, 5, 6]
    for a, b in zip(full[3:], rest):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    sa = load_safetensors(os.path.join(tmp_path, "a", "checkpoints", "step_000000006.ema.safetensors"))
    sb = load_safetensors(os.path.join(tmp_path, "b", "checkpoints", "step_000000006.ema.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- distributed --------------------------------------------------------------------------------
def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    cfg = tiny_cfg(train={"total_steps": 3, "ckpt_every": 0, "accum_steps": 1})
    tr = Trainer(cfg, out)
    recs = tr.train()
    torch.save({"sd": tr.model.state_dict(), "loss": [r["loss"] for r in recs]},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_identical_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(3)                                # the config's seed: the initial weights
    init = TinyModel().state_dict()
    assert all(torch.equal(r0["sd"][k], r1["sd"][k]) for k in r0["sd"])
    assert not torch.equal(r0["sd"]["head.weight"], init["head.weight"])
    assert torch.equal(r0["sd"]["encoder.weight"], init["encoder.weight"])     # frozen
    assert r0["loss"] != r1["loss"]                     # the ranks saw different samples
    assert json.load(open(tmp_path / "checkpoints" / "latest"))["step"] == 3


# ---- CLI ----------------------------------------------------------------------------------------
def test_train_main_tiny_config_writes_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    rc = train_main(["tiny_cpu", "--out", out, f"model.factory={TINY}", "train.total_steps=2",
                     "train.val_every=2", "val.synthetic.n=1"])
    assert rc == 0
    latest = json.load(open(os.path.join(out, "checkpoints", "latest")))
    assert latest["step"] == 2
    assert os.path.isfile(os.path.join(out, "checkpoints", latest["ema"]))
    assert os.path.isfile(os.path.join(out, "metrics.csv"))
    assert os.listdir(os.path.join(out, "val"))
    assert train_main(["tiny_cpu", "--out", out, "train.nope=1"]) == 2


# ---- the real model -----------------------------------------------------------------------------
@pytest.mark.parametrize("stage,mode,steps", [(1, "paper", 12), (2, "official", 4)])
def test_real_small_model_loss_decreases(tmp_path, stage, mode, steps):
    """VarFormer.small on one fixed pair. Stage 1 as configs/paper_stage1.yml (paper mode, CE
    reaching the VAR side); stage 2 in official mode with every loss term (random VGG)."""
    kwargs = {"var_grad": True} if stage == 1 else {}
    extra = {"model": {"preset": "small", "mode": mode, "kwargs": kwargs}, "stage": stage,
             "seed": 0, "optim": {"lr": 1e-3, "schedule": "constant"},
             "train": {"total_steps": steps, "batch_size": 1, "num_workers": 0,
                       "log_every": 1000, "ckpt_every": 0, "val_every": 0, "ema_decay": 0.5},
             "data": {"synthetic": {"n": 1, "size": 256}}}          # one fixed pair
    if stage == 2:
        vgg = tmp_path / "vgg19-dcbb9e9d.pth"
        torch.save({f"features.{k}": v for k, v in
                    VGG19Features(("relu5_4",)).features.state_dict().items()}, vgg)
        extra["loss"] = {"l1": 1.0, "psnr": 0.5, "percep": 1.0, "vgg_weights": str(vgg)}
    tr = Trainer(load_config(None, extra=extra), str(tmp_path / "run"))
    if stage == 1:
        assert not any(p.requires_grad for p in tr.model.Mainencoder.parameters())
        assert all(p.requires_grad for p in tr.model.cross_attn_blocks.parameters())
    assert not any(p.requires_grad for p in tr.model.blocks.parameters())
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    recs = tr.train()
    after = tr.model.state_dict()
    losses = [r["loss"] for r in recs]
    assert all(math.isfinite(x) for x in losses)
    want = {"ce", "feat"} | ({"l1", "psnr", "percep"} if stage == 2 else set())
    assert want <= set(recs[0])
    k = 3 if stage == 1 else 2
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k, losses
    assert losses[-1] < losses[0], losses
    changed = lambda prefix: any(not torch.equal(before[n], after[n])      # noqa: E731
                                 for n in before if n.startswith(prefix))
    assert changed("cross_attn_blocks") and changed("head.") and changed("ft_layers")
    assert not changed("blocks.") and not changed("encoder.")
    if stage == 2:
        assert changed("Mainencoder") and changed("main_decoder")


# ---- command-line behaviour: Ctrl-C, resume logs, metadata, one-line errors ----------------------
def _write_cfg(cfg, path):
    from varformer.train.config import dump_config
    dump_config(cfg, str(path))
    return str(path)


@pytest.mark.parametrize("load_aware", [False, True])
def test_training_thread_count_follows_the_load_only_when_asked(tmp_path, monkeypatch,
                                                                load_aware):
    """ATen's results depend on the thread count, so by default a run keeps it fixed (exact
    --resume on a machine whose load changes); train.load_aware lets it follow the load."""
    from varformer.ops import _ext
    seen = []
    original = Trainer._micro

    def micro(self, batch, sync):
        seen.append(_ext._FIXED[0])
        return original(self, batch, sync)

    monkeypatch.setattr(Trainer, "_micro", micro)
    Trainer(tiny_cfg(train={"total_steps": 1, "load_aware": load_aware}),
            str(tmp_path / "r")).train()
    assert seen and all((n == 0) == load_aware for n in seen)
    assert _ext._FIXED[0] == 0


def test_ctrl_c_saves_last_step_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of step 3 (accumulation 2): exit 130, one line naming the steps and
    the --resume command, a checkpoint of step 2; resuming gives the uninterrupted weights."""
    cfg = tiny_cfg()
    full = Trainer(cfg, str(tmp_path / "a"))
    full.train()
    path = _write_cfg(cfg, tmp_path / "cfg.yml")
    out = str(tmp_path / "b")
    calls = {"n": 0}
    original = Trainer._micro

    def micro(self, batch, sync):
        calls["n"] += 1
        if calls["n"] == 5:                     # first micro-batch of step 3
            raise KeyboardInterrupt
        return original(self, batch, sync)

    monkeypatch.setattr(Trainer, "_micro", micro)
    assert train_main([path, "--out", out]) == 130
    err = capsys.readouterr().err
    assert "stopped at step 2; saved a checkpoint of step 2; continue with: varformer train" in err
    assert err.strip().endswith("--resume") and "Traceback" not in err
    assert json.load(open(os.path.join(out, "checkpoints", "latest")))["step"] == 2
    monkeypatch.setattr(Trainer, "_micro", original)
    assert train_main([path, "--out", out, "--resume"]) == 0
    sa = load_safetensors(os.path.join(tmp_path, "a", "checkpoints", "step_000000006.ema.safetensors"))
    sb = load_safetensors(os.path.join(out, "checkpoints", "step_000000006.ema.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing.startswith("varformer train: done at step 6; loss ") and "ema.safetensors" in closing


def test_ctrl_c_inside_the_update_saves_nothing_new(tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg()
    path = _write_cfg(cfg, tmp_path / "cfg.yml")
    out = str(tmp_path / "b")
    original = Trainer._optimizer_step

    def step(self):
        if self.step == 4:                      # parameters half updated: not a safe point
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    assert train_main([path, "--out", out]) == 130
    err = capsys.readouterr().err
    assert "stopped at step 4; last checkpoint step 3; continue with:" in err
    assert json.load(open(os.path.join(out, "checkpoints", "latest")))["step"] == 3


def test_resume_leaves_no_duplicate_metric_rows(tmp_path):
    import csv as _csv
    cfg = tiny_cfg()
    out = str(tmp_path / "b")
    Trainer(cfg, out).train(until=4)          # killed after step 4, last checkpoint step 3
    Trainer(cfg, out, resume=True).train()
    rows = list(_csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    keys = [(r["step"], r["name"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert sorted({int(r["step"]) for r in rows}) == [1, 2, 3, 4, 5, 6]


def test_checkpoint_metadata_and_optimizer_option(tmp_path):
    from varformer.train.checkpoint import load_state, read_metadata
    cfg = tiny_cfg(train={"total_steps": 2, "ckpt_every": 0, "save_optimizer": False},
                   model={"kwargs": {}, "mode": "paper", "preset": "small"})
    tr = Trainer(cfg, str(tmp_path))
    tr.train()
    info = tr.ckpt.latest()
    for f in ("model", "ema"):
        meta = read_metadata(info[f])
        assert meta["preset"] == "small" and meta["mode"] == "paper" and meta["step"] == 2
        assert meta["model"]["factory"] == TINY and meta["kwargs"] == {}
    assert load_state(info["state"])["optimizer"] is None
    back = Trainer(cfg, str(tmp_path), resume=True)      # resumes with fresh Adam moments
    assert back.step == 2


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    cfg = tiny_cfg()
    cfg["data"] = {"root": str(tmp_path / "nowhere"), "tasks": ["dehaze"]}
    path = _write_cfg(cfg, tmp_path / "cfg.yml")
    assert train_main([path, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("varformer train: ") and "\n" not in err and "nowhere" in err


def test_stage1_without_adapter_in_paper_mode_is_a_clear_error(tmp_path):
    """Paper mode's stage 1 trains through the adapter only (the VAR branch has no gradient):
    ablating the adapter leaves nothing to train, said before any step; with var_grad it trains."""
    extra = {"model": {"preset": "small", "mode": "paper", "ablation": {"adapter": False}},
             "stage": 1, "seed": 0,
             "train": {"total_steps": 1, "batch_size": 1, "num_workers": 0, "log_every": 1000,
                       "ckpt_every": 0, "val_every": 0},
             "data": {"synthetic": {"n": 1, "size": 256}}}
    with pytest.raises(ValueError, match=r"ablation\.adapter=false.*var_grad=true"):
        Trainer(load_config(None, extra=extra), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    extra["model"]["kwargs"] = {"var_grad": True}
    tr = Trainer(load_config(None, extra=extra), str(tmp_path / "run2"))
    assert math.isfinite(tr.train()[-1]["loss"])


def test_a_loss_without_gradient_names_the_trainable_set(tmp_path):
    """A trainable set that no loss term reaches fails at the first step with a message naming
    it, not with autograd's 'element 0 of tensors does not require grad'."""
    cfg = tiny_cfg(model={"trainable": ["Mainencoder"]},
                   loss={"ce": 0.1, "feat": 0.5, "l1": 0.0, "psnr": 0.0, "percep": 0.0})
    tr = Trainer(cfg, str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match=r"no gradient.*Mainencoder"):
        tr.train()


def _ddp_ctrl_c_worker(rank, world, port, cfg_path, out, resume, result):
    """train_main on one of two gloo ranks; without ``resume`` every rank gets Ctrl-C at the
    first micro-batch of step 3 (the terminal's SIGINT reaches all of torchrun's workers)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    import contextlib
    import io
    if not resume:
        calls = {"n": 0}
        original = Trainer._micro

        def micro(self, batch, sync):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return original(self, batch, sync)
        Trainer._micro = micro
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        rc = train_main([cfg_path, "--out", out] + (["--resume"] if resume else []))
    with open(f"{result}.rank{rank}.json", "w") as f:
        json.dump({"rc": rc, "err": err.getvalue(), "out": stdout.getvalue()}, f)


def test_ctrl_c_under_ddp_saves_the_last_step_on_rank_0(tmp_path):
    """Ctrl-C on two DDP ranks: rank 0 writes step 2 alone (no collective with the stopped
    ranks), both exit 130; --resume on two ranks continues from step 2 to the end with the
    weights of an uninterrupted two-rank run."""
    cfg = tiny_cfg()                         # 6 steps, accumulation 2
    path = _write_cfg(cfg, tmp_path / "cfg.yml")

    def spawn(out, resume, tag):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_ctrl_c_worker, args=(2, port, path, str(out), resume, str(tmp_path / tag)),
                 nprocs=2, join=True)
        return [json.load(open(tmp_path / f"{tag}.rank{r}.json")) for r in (0, 1)]

    r0, r1 = spawn(tmp_path / "b", False, "stop")
    assert r0["rc"] == 130 and r1["rc"] == 130
    assert "stopped at step 2; saved a checkpoint of step 2; continue with:" in r0["err"]
    assert "Traceback" not in r0["err"] + r1["err"]
    assert json.load(open(tmp_path / "b" / "checkpoints" / "latest"))["step"] == 2
    r0, r1 = spawn(tmp_path / "b", True, "resume")
    assert r0["rc"] == 0 and r1["rc"] == 0
    assert "resumed from step 2" in r0["out"] and "rank 0 alone" in r0["out"]
    assert json.load(open(tmp_path / "b" / "checkpoints" / "latest"))["step"] == 6
    full = tmp_path / "a"
    _ = spawn(full, True, "full")            # --resume with no checkpoint: a fresh 6-step run
    sa = load_safetensors(os.path.join(full, "checkpoints", "step_000000006.model.safetensors"))
    sb = load_safetensors(os.path.join(tmp_path, "b", "checkpoints", "step_000000006.model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
