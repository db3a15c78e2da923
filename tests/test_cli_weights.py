"""Checkpoints carry their model (preset, mode, constructor kwargs in the safetensors header):
VarFormer.from_pretrained and `varformer restore` load them without flags; a file that does not
fit is a one-line error naming the fitting preset/mode or the override to drop."""
import pytest
import torch

from varformer import cli
from varformer.models import VarFormer
from varformer.models.varformer import WeightsMismatchError
from varformer.train.checkpoint import model_metadata, read_metadata, save_safetensors

KW = {"ch_mult": [1, 1, 2, 2, 2]}


@pytest.fixture(scope="module")
def paper_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = VarFormer.small(mode="paper", **KW)
    path = tmp_path_factory.mktemp("ckpt") / "step.ema.safetensors"
    cfg = {"name": "t", "stage": 2,
           "model": {"preset": "small", "mode": "paper", "kwargs": KW, "vae": None}}
    save_safetensors(model.state_dict(), str(path), model_metadata(cfg, 7))
    return path, model.state_dict()


def test_metadata_round_trip(paper_ckpt):
    path, sd = paper_ckpt
    meta = read_metadata(str(path))
    assert (meta["preset"], meta["mode"], meta["kwargs"], meta["step"]) == ("small", "paper",
                                                                            KW, 7)
    m = VarFormer.from_pretrained(str(path))
    assert m.mode == "paper" and not m.Mainencoder.cat_rec_syn["Level_1"].concat
    got = m.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_override_that_does_not_fit(paper_ckpt):
    path, _ = paper_ckpt
    with pytest.raises(WeightsMismatchError) as err:
        VarFormer.from_pretrained(str(path), preset="full")
    text = str(err.value)
    assert "preset='full' mode='paper'" in text and "drop the override" in text
    assert "in the file but" in text and "\n" not in text
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_file_without_metadata_names_what_fits(tmp_path):
    torch.manual_seed(1)
    sd = VarFormer.small(mode="official").state_dict()
    torch.save({"params_ema": sd}, tmp_path / "released_format.pth")
    with pytest.raises(WeightsMismatchError, match="defaults for a file without varformer "
                       "metadata.*fits preset='small' mode='official'"):
        VarFormer.from_pretrained(str(tmp_path / "released_format.pth"))
    m = VarFormer.from_pretrained(str(tmp_path / "released_format.pth"), preset="small")
    assert m.mode == "official"


def test_cli_one_line_errors_for_foreign_files(tmp_path, capsys):
    (tmp_path / "in.png").write_bytes(b"")
    torch.save({"conv.weight": torch.zeros(2, 3)}, tmp_path / "foreign.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    for name, want in (("foreign.pth", "no preset/mode fits it"),
                       ("junk.safetensors", "cannot load --weights")):
        rc = cli.main(["restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"),
                       "--weights", str(tmp_path / name), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and want in err and "\n" not in err and "Traceback" not in err, err
