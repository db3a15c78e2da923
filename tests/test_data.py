"""varformer.data: pairing, datasets, multi-task sampler and the layout check (CPU, synthetic
images written to tmp_path)."""
import collections
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from varformer.data import (CleanDataset, MultiTaskSampler, NoisyDataset, PairedDataset,
                            build_test_datasets, build_train_dataset, check, data_main,
                            pair_files, read_image)
from varformer.data.datasets import pad_to


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def flat(value, h=12, w=14):
    return np.full((h, w, 3), value, np.uint8)


def coords(h, w, swap=False):
    """[h, w, 3] uint8: channel 0 = row, 1 = column (swapped for swap=True), 2 = constant."""
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    a, b = (x, y) if swap else (y, x)
    return np.stack([a, b, np.full_like(y, 7)], -1)


def to_uint8(t):
    """[-1, 1] tensor [3, H, W] -> integer array [3, H, W]."""
    return ((t + 1) / 2 * 255).round().to(torch.int64).numpy()


# ------------------------------------------------------------------------------------ pairing

def test_pairing_by_name_not_position(tmp_path):
    names = [f"img{i}" for i in range(8)]
    lq_ext = [".png", ".JPG", ".bmp", ".tif", ".jpeg", ".PNG", ".tiff", ".png"]
    gt_ext = [".tif", ".png", ".PNG", ".bmp", ".png", ".jpg", ".png", ".jpeg"]
    order = list(range(8))
    random.Random(0).shuffle(order)
    for k in order:   # written in shuffled order; the extensions change the sorted order too
        save(tmp_path / "lq" / (names[k] + lq_ext[k]), flat(10 * k))
        save(tmp_path / "gt" / (names[k] + gt_ext[k]), flat(10 * k))
    save(tmp_path / "gt" / "sub" / "deep.png", flat(200))
    save(tmp_path / "lq" / "sub" / "deep.png", flat(200))
    (tmp_path / "lq" / "notes.txt").write_text("not an image")
    pairs = pair_files(tmp_path / "lq", tmp_path / "gt")
    assert len(pairs) == 9
    for lq, gt in pairs:
        assert lq.stem == gt.stem
        assert lq.relative_to(tmp_path / "lq").parent == gt.relative_to(tmp_path / "gt").parent
        if lq.suffix.lower() != ".jpg" and gt.suffix.lower() not in (".jpg", ".jpeg"):
            assert torch.equal(read_image(lq), read_image(gt))


def test_reside_rule_many_to_one(tmp_path):
    for gid in ("0002", "0010", "0100"):
        save(tmp_path / "gt" / f"{gid}.png", flat(int(gid) % 256))
        for beta in ("0.8_0.2", "0.9_0.16"):
            save(tmp_path / "hazy" / f"{gid}_{beta}.jpg", flat(50))
    pairs = pair_files(tmp_path / "hazy", tmp_path / "gt", "reside")
    assert len(pairs) == 6
    assert all(gt.name == lq.name.split("_")[0] + ".png" for lq, gt in pairs)
    assert len({gt for _, gt in pairs}) == 3
    # custom rules: a callable and a regex dict
    assert pair_files(tmp_path / "hazy", tmp_path / "gt", lambda n: n[:4] + ".png") == pairs
    assert pair_files(tmp_path / "hazy", tmp_path / "gt",
                      {"pattern": r"_.*$", "repl": ""}) == pairs
    # LQ split into part folders next to a flat GT folder
    for i, (lq, _) in enumerate(pairs):
        save(tmp_path / "parts" / f"part{i % 2}" / lq.name, flat(50))
    parts = pair_files(tmp_path / "parts", tmp_path / "gt", "reside", match_subdirs=False)
    assert sorted((lq.name, gt) for lq, gt in parts) == sorted((lq.name, gt) for lq, gt in pairs)
    with pytest.raises(ValueError, match="no GT partner"):
        pair_files(tmp_path / "parts", tmp_path / "gt", "reside")


def test_pairing_errors_name_files(tmp_path):
    for i in range(3):
        save(tmp_path / "lq" / f"a{i}.png", flat(i))
        save(tmp_path / "gt" / f"a{i}.png", flat(i))
    save(tmp_path / "lq" / "orphan_lq.png", flat(1))
    with pytest.raises(ValueError, match="orphan_lq.png"):
        pair_files(tmp_path / "lq", tmp_path / "gt")
    (tmp_path / "lq" / "orphan_lq.png").unlink()
    save(tmp_path / "gt" / "orphan_gt.png", flat(1))
    with pytest.raises(ValueError, match="orphan_gt.png"):
        pair_files(tmp_path / "lq", tmp_path / "gt")
    assert len(pair_files(tmp_path / "lq", tmp_path / "gt", strict=False)) == 3
    save(tmp_path / "gt" / "a0.jpg", flat(1))   # two GT files with stem a0
    with pytest.raises(ValueError, match="a0.png"):
        pair_files(tmp_path / "lq", tmp_path / "gt", strict=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        pair_files(tmp_path / "empty", tmp_path / "gt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pair_files(tmp_path / "nowhere", tmp_path / "gt")
    with pytest.raises(ValueError, match="unknown pairing rule"):
        pair_files(tmp_path / "lq", tmp_path / "gt", "no-such-rule")


def test_read_image_formats_and_unreadable(tmp_path):
    save(tmp_path / "rgb.png", coords(5, 6))
    img = read_image(tmp_path / "rgb.png")
    assert img.shape == (3, 5, 6) and img.dtype == torch.float32
    assert torch.allclose(img[1, 2, 4] * 255, torch.tensor(4.0))
    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((4, 4, 4), 255, np.uint8), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "grey.png").shape == (3, 4, 4)
    assert read_image(tmp_path / "alpha.png").shape == (3, 4, 4)
    assert torch.allclose(read_image(tmp_path / "deep.png"), torch.ones(3, 4, 4))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(OSError, match="broken.png"):
        read_image(tmp_path / "broken.png")


# ----------------------------------------------------------------------------------- datasets

def test_unreadable_and_size_mismatch_in_dataset(tmp_path):
    save(tmp_path / "lq" / "a.png", flat(1, 40, 40))
    save(tmp_path / "gt" / "a.png", flat(2, 40, 42))
    save(tmp_path / "lq" / "b.png", flat(1, 40, 40))
    (tmp_path / "gt" / "b.png").write_bytes(b"garbage")
    ds = PairedDataset(tmp_path / "lq", tmp_path / "gt", crop=32)
    with pytest.raises(ValueError, match=r"mismatch.*lq[/\\]a.png.*gt[/\\]a.png"):
        ds[0]
    with pytest.raises(OSError, match=r"gt[/\\]b.png"):
        ds[1]


@pytest.mark.parametrize("h,w", [(20, 24), (10, 30)])   # reflect / replicate (10 < pad 22)
def test_small_images_are_padded_not_replaced(tmp_path, h, w):
    save(tmp_path / "lq" / "x.png", coords(h, w))
    save(tmp_path / "gt" / "x.png", coords(h, w, swap=True))
    ds = PairedDataset(tmp_path / "lq", tmp_path / "gt", crop=32, augment=False)
    item = ds[0]
    assert item["lq"].shape == item["gt"].shape == (3, 32, 32)
    lq = torch.from_numpy(coords(h, w)).permute(2, 0, 1).float()
    expected = pad_to(lq, 32).numpy().astype(np.int64)
    assert np.array_equal(to_uint8(item["lq"]), expected)          # LQ content, padded
    assert not torch.equal(item["lq"], item["gt"])                  # not a clean pair
    mode = "reflect" if h == 20 else "replicate"
    ref = torch.nn.functional.pad(lq, (0, 32 - w, 0, 32 - h), mode=mode)
    assert np.array_equal(expected, ref.numpy().astype(np.int64))


def test_crop_alignment_and_augmentation(tmp_path):
    h, w, crop = 48, 64, 16
    save(tmp_path / "lq" / "x.png", coords(h, w))
    save(tmp_path / "gt" / "x.png", coords(h, w, swap=True))
    plain = PairedDataset(tmp_path / "lq", tmp_path / "gt", crop=crop, augment=False)
    tops = set()
    for s in range(20):
        lq = to_uint8(plain[(0, s)]["lq"])
        top, left = lq[0, 0, 0], lq[1, 0, 0]
        tops.add((top, left))
        assert np.array_equal(lq, coords(h, w)[top:top + crop, left:left + crop].transpose(2, 0, 1))
    assert len(tops) > 10                                            # the crop moves
    ds = PairedDataset(tmp_path / "lq", tmp_path / "gt", crop=crop, augment=True)
    orientations = set()
    for s in range(200):
        item = ds[(0, s)]
        lq, gt = to_uint8(item["lq"]), to_uint8(item["gt"])
        # same place and same transform: gt(row, col) = swap of lq(row, col) at every pixel
        assert np.array_equal(gt[0], lq[1]) and np.array_equal(gt[1], lq[0])
        # the row/column gradients of the (row, column) channels identify the symmetry
        orientations.add(tuple(int(v) for v in (lq[0, 1, 0] - lq[0, 0, 0],
                                                lq[0, 0, 1] - lq[0, 0, 0],
                                                lq[1, 1, 0] - lq[1, 0, 0],
                                                lq[1, 0, 1] - lq[1, 0, 0])))
    assert len(orientations) == 8                                    # all flips / rotations
    item = ds[0]                                                     # int keys use torch's RNG
    assert item["lq"].shape == (3, crop, crop) and item["task"] == "derain"
    full = PairedDataset(tmp_path / "lq", tmp_path / "gt", phase="test")[0]
    assert full["lq"].shape == (3, h, w)
    assert float(full["lq"].min()) == -1.0 and float(full["gt"].max()) <= 1.0


def _noise_items(ds):
    return [ds[i] for i in range(len(ds))]


def test_test_noise_deterministic(tmp_path):
    for i in range(3):
        save(tmp_path / "clean" / f"{i}.png", flat(128, 24, 20))
    a = NoisyDataset(tmp_path / "clean", sigma=(15, 50), phase="test", clip=False)
    b = NoisyDataset(tmp_path / "clean", sigma=(15, 50), phase="test", clip=False)
    assert len(a) == 6
    ia, ib = _noise_items(a), _noise_items(b)
    for x, y in zip(ia, ib):
        assert torch.equal(x["lq"], y["lq"]) and x["sigma"] == y["sigma"]
    assert [x["sigma"] for x in ia] == [15.0] * 3 + [50.0] * 3
    assert not torch.equal(ia[0]["lq"], ia[1]["lq"])                 # per image
    for x in ia:                                                     # noise std = sigma / 255
        std = ((x["lq"] - x["gt"]) / 2).std().item() * 255
        assert abs(std - x["sigma"]) < 0.15 * x["sigma"]
    torch.manual_seed(123)                                           # global RNG irrelevant
    loader = DataLoader(a, batch_size=2, num_workers=2)
    lq = torch.cat([batch["lq"] for batch in loader])
    assert torch.equal(lq, torch.stack([x["lq"] for x in ia]))
    c = NoisyDataset(tmp_path / "clean", sigma=(15, 50), phase="test", seed=1, clip=False)
    assert not torch.equal(c[0]["lq"], ia[0]["lq"])
    train = NoisyDataset(tmp_path / "clean", sigma=(15, 25, 50), crop=16)
    sigmas = {train[(0, s)]["sigma"] for s in range(30)}
    assert sigmas == {15.0, 25.0, 50.0}
    assert torch.equal(train[(1, 7)]["lq"], train[(1, 7)]["lq"])


def test_clean_dataset(tmp_path):
    save(tmp_path / "hr" / "a.png", coords(40, 40))
    item = CleanDataset(tmp_path / "hr", crop=32)[0]
    assert item["lq"].shape == (3, 32, 32) and torch.equal(item["lq"], item["gt"])
    assert item["task"] == "clean"


# ------------------------------------------------------------------------------------ sampler

def test_sampler_task_frequencies():
    sizes = {"dehaze": 300, "lowlight": 20, "derain": 100, "denoise": 80, "real_denoise": 50,
             "deblur": 60}
    weights = {"dehaze": 0.3, "lowlight": 0.1, "derain": 0.2, "denoise": 0.2,
               "real_denoise": 0.1, "deblur": 0.1}
    s = MultiTaskSampler(sizes, weights, num_samples=20000, seed=3)
    bounds, start = {}, 0
    for t, n in sizes.items():
        bounds[t] = (start, start + n)
        start += n
    counts = collections.Counter(next(t for t, (a, b) in bounds.items() if a <= i < b)
                                 for i in s)
    for t, wt in weights.items():
        assert abs(counts[t] / 20000 - wt) < 0.015, (t, counts[t])
    # within a task, indices cycle through a permutation: lowlight (20 images, ~2000 draws)
    low = [i for i in s if bounds["lowlight"][0] <= i < bounds["lowlight"][1]]
    assert sorted(low[:20]) == list(range(*bounds["lowlight"]))
    assert list(s) == list(s)                                        # deterministic
    s.set_epoch(1)
    assert list(s)[:50] != list(MultiTaskSampler(sizes, weights, 20000, seed=3))[:50]
    with pytest.raises(ValueError, match="missing"):
        MultiTaskSampler(sizes, {"dehaze": 1.0}, 10)


def test_sampler_ranks_disjoint():
    sizes, weights = {"a": 1000, "b": 500}, {"a": 0.5, "b": 0.5}
    one = list(MultiTaskSampler(sizes, weights, num_samples=400, seed=5))
    r0 = list(MultiTaskSampler(sizes, weights, 400, seed=5, num_replicas=2, rank=0))
    r1 = list(MultiTaskSampler(sizes, weights, 400, seed=5, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 200
    assert not set(r0) & set(r1)
    assert [x for pair in zip(r0, r1) for x in pair] == one
    odd = [list(MultiTaskSampler(sizes, weights, 401, seed=5, num_replicas=2, rank=r))
           for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 201


def test_sampler_resume_mid_epoch():
    sizes, weights = {"a": 30, "b": 70}, {"a": 0.7, "b": 0.3}
    s = MultiTaskSampler(sizes, weights, num_samples=100, seed=2, num_replicas=2, rank=1,
                         item_seeds=True)
    s.set_epoch(4)
    it = iter(s)
    head = [next(it) for _ in range(17)]
    state = s.state_dict()
    assert state["position"] == 17 and state["epoch"] == 4
    rest = list(it)
    r = MultiTaskSampler(sizes, weights, num_samples=100, seed=2, num_replicas=2, rank=1,
                         item_seeds=True)
    r.load_state_dict(state)
    r.set_epoch(4)                                                   # same epoch: keeps position
    assert list(r) == rest
    assert list(r) == head + rest                                    # next pass: from the start
    r.load_state_dict(s.state_dict(consumed=5))
    assert list(r) == (head + rest)[5:]
    with pytest.raises(ValueError, match="seed"):
        MultiTaskSampler(sizes, weights, 100, seed=9, num_replicas=2, rank=1).load_state_dict(
            state)


# ------------------------------------------------------------------------ config / loaders

def make_tree(root):
    """A small tree in registry layouts: derain, dehaze (reside), denoise (noisy), + tests."""
    rng = np.random.default_rng(0)
    pic = lambda h=40, w=36: rng.integers(0, 256, (h, w, 3))
    for i in range(5):
        img = pic()
        save(root / "derain/rain13k/train/input" / f"r{i}.png", img)
        save(root / "derain/rain13k/train/target" / f"r{i}.png", img // 2)
    for i in range(2):
        save(root / "derain/test/Rain100L/input" / f"{i}.png", pic())
        save(root / "derain/test/Rain100L/target" / f"{i}.png", pic())
    for i in range(3):
        save(root / "dehaze/RESIDE2/OTS_ALPHA2/clear/clear_images" / f"{i:04d}.jpg", pic())
        for beta in ("0.8_0.2", "1_0.16"):
            save(root / "dehaze/RESIDE2/OTS_ALPHA2/haze/OTS" / f"{i:04d}_{beta}.jpg", pic())
    for i in range(4):
        save(root / "denoise/WED_BSD400/gt" / f"n{i}.bmp", pic(20, 20))   # smaller than crop
        save(root / "denoise/BSD68" / f"t{i}.png", pic())


def config(root, **extra):
    return {"root": str(root), "crop": 32, "seed": 0,
            "tasks": {"derain": {}, "dehaze": {}, "denoise": {"weight": 0.5}},
            "test": {"Rain100L": {}, "BSD68": {"sigma": [15, 50]}}, **extra}


def test_builders_and_dataloader_workers(tmp_path):
    make_tree(tmp_path)
    ds = build_train_dataset(config(tmp_path))
    assert ds.task_ranges == {"derain": (0, 5), "dehaze": (5, 11), "denoise": (11, 15)}
    assert ds.weights == pytest.approx({"derain": 0.2 / 1.0, "dehaze": 0.3 / 1.0,
                                        "denoise": 0.5 / 1.0})
    tests = build_test_datasets(config(tmp_path))
    assert sorted(tests) == ["BSD68_s15", "BSD68_s50", "Rain100L"]
    assert len(tests["Rain100L"]) == 2 and tests["BSD68_s50"][0]["sigma"] == 50.0
    assert tests["Rain100L"][0]["lq"].shape == (3, 40, 36)

    def batches(workers):
        sampler = MultiTaskSampler(ds, ds.weights, num_samples=24, seed=1, item_seeds=True)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers)
        return list(loader)

    two, zero = batches(2), batches(0)
    assert len(two) == 6
    for a, b in zip(two, zero):
        assert a["lq"].shape == (4, 3, 32, 32)
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
        assert a["task"] == b["task"]
    tasks = {t for b in two for t in b["task"]}
    assert tasks <= {"derain", "dehaze", "denoise"} and len(tasks) >= 2
    with pytest.raises(ValueError, match="unknown key"):
        build_train_dataset({"root": str(tmp_path), "tasks": {"derain": {"wieght": 1}}})
    with pytest.raises(ValueError, match="unknown task"):
        build_train_dataset({"root": str(tmp_path), "tasks": ["rain"]})


def test_data_check_cli(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    make_tree(tmp_path / "data")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": config(tmp_path / "data")}))
    assert data_main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[2]: line.split() for line in out.splitlines()
            if line.startswith(("train", "test"))}
    assert rows["derain"][4] == "5" and rows["dehaze"][4] == "6" and rows["denoise"][4] == "4"
    assert rows["Rain100L"][4] == "2" and rows["BSD68"][4] == "4"
    assert "OK" in out and "smaller than the crop" in out

    # broken: a missing GT partner, an unreadable image, a missing test folder
    (tmp_path / "data/derain/rain13k/train/target/r3.png").unlink()
    (tmp_path / "data/dehaze/RESIDE2/OTS_ALPHA2/haze/OTS/0001_1_0.16.jpg").write_bytes(b"xx")
    path.write_text(yaml.safe_dump({"data": config(tmp_path / "data",
                                                   test={"Rain100H": {}})}))
    assert data_main(["check", str(path), "--all"]) == 1
    out = capsys.readouterr().out
    assert "r3.png" in out and "0001_1_0.16.jpg" in out and "Rain100H" in out
    assert "4 error(s)" in out                                       # Rain100H: LQ and GT
    report = check(config(tmp_path / "data"), print_report=False)
    assert not report.ok and any("r3.png" in e for e in report.errors)
    assert data_main(["check", str(tmp_path / "missing.yaml")]) == 1


def test_data_check_command_line_and_synthetic_config(tmp_path, capsys):
    """`varformer data check CONFIG` (no doubled 'check'); a synthetic-data training config is
    reported as such, not as a config without tasks."""
    from varformer import cli

    cfg = tmp_path / "tiny.yml"
    cfg.write_text("name: t\ndata:\n  synthetic: {n: 5, size: 64}\nval:\n  synthetic: {n: 1}\n")
    assert cli.main(["data", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "synthetic pairs (5 random 64x64" in out and "no training tasks" not in out
    assert "val.synthetic" in out
    assert cli.main(["data", "check", str(tmp_path / "missing.yml")]) == 1
    assert "config" in capsys.readouterr().out
