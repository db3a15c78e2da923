"""Swin drop-ins and patching against eager SwinIR-style modules with the same weights."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import DEVICE, rel_err
from varformer.ops import (ResidualSwinTransformerBlock, SwinTransformerBlock, WindowAttention,
                           patch_swin, unpatch_swin)
from varformer.ops.window_attention import region_mask, relative_position_index


# ---------------------------------------------------------------------- eager SwinIR-style model
class EagerWindowAttention(nn.Module):
    def __init__(self, dim, ws, nh):
        super().__init__()
        self.window_size, self.num_heads, self.scale = (ws, ws), nh, (dim // nh) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, nh))
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C))


class EagerMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EagerSwinBlock(nn.Module):
    def __init__(self, dim, res, nh, ws, shift):
        super().__init__()
        self.input_resolution, self.window_size, self.shift_size = res, ws, shift
        self.norm1, self.attn = nn.LayerNorm(dim), EagerWindowAttention(dim, ws, nh)
        self.norm2, self.mlp = nn.LayerNorm(dim), EagerMlp(dim)
        self.register_buffer("attn_mask", region_mask(*res, ws, shift) if shift else None)

    def forward(self, x, x_size):
        H, W = x_size
        B, L, C = x.shape
        ws, s = self.window_size, self.shift_size
        h = self.norm1(x).view(B, H, W, C)
        if s:
            h = torch.roll(h, (-s, -s), (1, 2))
        h = h.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        mask = region_mask(H, W, ws, s).to(x) if s else None
        h = self.attn(h, mask)
        h = h.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        if s:
            h = torch.roll(h, (s, s), (1, 2))
        x = x + h.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class EagerLayer(nn.Module):
    def __init__(self, dim, res, depth, nh, ws):
        super().__init__()
        self.blocks = nn.ModuleList(EagerSwinBlock(dim, res, nh, ws, 0 if i % 2 == 0 else ws // 2)
                                    for i in range(depth))

    def forward(self, x, x_size):
        for b in self.blocks:
            x = b(x, x_size)
        return x


class EagerRSTB(nn.Module):
    def __init__(self, dim, res, depth, nh, ws):
        super().__init__()
        self.residual_group = EagerLayer(dim, res, depth, nh, ws)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        with warnings.catch_warnings():  # zero-element weight, as in VarFormer
            warnings.simplefilter("ignore", UserWarning)
            self.patch_embed.proj = nn.Conv2d(0, dim, 4, 4)

    def forward(self, x, x_size):
        H, W = x_size
        y = self.residual_group(x, x_size).transpose(1, 2).reshape(x.shape[0], -1, H, W)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class TinySwinIR(nn.Module):
    """A SwinIR-shaped network: conv in, two RSTBs, conv out."""

    def __init__(self, dim=32, res=(8, 12), nh=2, ws=4):
        super().__init__()
        self.res = res
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.layers = nn.ModuleList(EagerRSTB(dim, res, 2, nh, ws) for _ in range(2))
        self.conv_last = nn.Conv2d(dim, 3, 3, 1, 1)

    def forward(self, img):
        B, _, H, W = img.shape
        x = self.conv_first(img).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x, (H, W))
        return self.conv_last(x.transpose(1, 2).reshape(B, -1, H, W)) + img


def _randomise(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", ["reference", "auto", "triton"], indirect=True)
def test_window_attention_module_matches_swin(backend):
    ours, eager = WindowAttention(32, 4, 2).to(DEVICE), EagerWindowAttention(32, 4, 2).to(DEVICE)
    _randomise(eager)
    ours.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(6, 16, 32, device=DEVICE)
    mask = region_mask(8, 12, 4, 2).to(DEVICE)
    assert rel_err(ours(x, mask), eager(x, mask)) < 1e-5
    assert rel_err(ours(x), eager(x)) < 1e-5
    xg = x.clone().requires_grad_()
    ours(xg, mask).sum().backward()
    assert ours.relative_position_bias_table.grad.abs().sum() > 0


def test_window_attention_loads_timm_format():
    eager = EagerWindowAttention(32, 4, 2)
    sd = {k: v for k, v in eager.state_dict().items() if k != "relative_position_index"}
    ours = WindowAttention(32, (4, 4), 2)
    ours.load_state_dict(sd, strict=True)
    assert torch.equal(ours.relative_position_index, relative_position_index(4))
    assert set(ours.state_dict()) == set(eager.state_dict())


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"], indirect=True)
def test_blocks_match_eager_swinir(backend):
    res = (8, 12)
    ours = ResidualSwinTransformerBlock(32, res, depth=2, num_heads=2, window_size=4).to(DEVICE)
    eager = EagerRSTB(32, res, 2, 2, 4).to(DEVICE)
    _randomise(eager)
    ours.load_state_dict(eager.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 96, 32, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = ours(x, res), eager(x2, res)
    assert rel_err(out, ref) < 1e-5
    out.square().sum().backward()
    ref.square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-4
    g_ours = dict(ours.named_parameters())
    for n, p in eager.named_parameters():
        if p.grad is not None:
            assert rel_err(g_ours[n].grad, p.grad) < 1e-4, n


def test_varformer_rstb_keys():
    """One RSTB of VarFormer's DAE at level 1 (C=160, 8 heads, 4×4 windows at 128²), as in the
    released checkpoint."""
    m = ResidualSwinTransformerBlock(160, (128, 128), depth=2, num_heads=8, window_size=4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["residual_group.blocks.0.attn.relative_position_bias_table"] == (49, 8)
    assert shapes["residual_group.blocks.0.attn.relative_position_index"] == (16, 16)
    assert shapes["residual_group.blocks.1.attn_mask"] == (1024, 16, 16)
    assert "residual_group.blocks.0.attn_mask" not in shapes
    assert shapes["residual_group.blocks.0.mlp.fc1.weight"] == (640, 160)
    assert shapes["conv.weight"] == (160, 160, 3, 3)
    assert shapes["patch_embed.proj.weight"] == (160, 0, 4, 4)
    assert shapes["patch_embed.proj.bias"] == (160,)
    assert len(shapes) == 14 + 15 + 2 + 2   # the 33 rows of one RSTB in the released list


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"], indirect=True)
def test_patch_swin_keeps_outputs_and_keys(backend):
    model = TinySwinIR().to(DEVICE)
    _randomise(model)
    img = torch.randn(1, 3, 8, 12, device=DEVICE)
    keys = list(model.state_dict())
    before = model(img)
    assert patch_swin(model) == 4
    assert patch_swin(model) == 0          # already patched
    after = model(img)
    assert rel_err(after, before) < 1e-5
    assert list(model.state_dict()) == keys
    model.load_state_dict(model.state_dict(), strict=True)
    assert unpatch_swin(model) == 4
    assert rel_err(model(img), before) < 1e-7


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_patched_block_pads_like_timm(backend):
    """A patched block on a size that is not a multiple of the window pads (zeros after norm1,
    bottom/right), attends, and crops — timm's behaviour."""
    blk = EagerSwinBlock(16, (12, 12), 2, 4, 2).to(DEVICE)
    _randomise(blk)
    x = torch.randn(1, 10, 7, 16, device=DEVICE)
    ref_blk = blk
    h = F.pad(ref_blk.norm1(x), (0, 0, 0, 1, 0, 2))               # 12 × 8
    B, H, W, C = h.shape
    s, ws = 2, 4
    hh = torch.roll(h, (-s, -s), (1, 2)).view(B, H // ws, ws, W // ws, ws, C)
    hh = hh.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
    a = ref_blk.attn(hh, region_mask(H, W, ws, s).to(x))
    a = a.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    y = x + torch.roll(a, (s, s), (1, 2))[:, :10, :7]
    y = y + ref_blk.mlp(ref_blk.norm2(y))
    patch_swin(blk)
    assert rel_err(blk(x), y) < 1e-5


def test_block_errors():
    blk = SwinTransformerBlock(16, (8, 8), 2, window_size=4, shift_size=2)
    with pytest.raises(ValueError, match="tokens"):
        blk(torch.randn(1, 60, 16), (8, 8))
    with pytest.raises(ValueError, match="shift_size must be in"):
        SwinTransformerBlock(16, (8, 8), 2, window_size=4, shift_size=4)
    with pytest.raises(ValueError, match="must divide dim"):
        WindowAttention(16, 4, 3)


def test_patch_timm_swin():
    """timm's SwinTransformer ([B, H, W, C] blocks); runs where timm imports (not on the CPU
    machines, whose torch build has no torchvision)."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    model = timm_swin.SwinTransformer(img_size=56, patch_size=4, embed_dim=48, depths=(2, 2),
                                      num_heads=(3, 6), window_size=7, num_classes=10)
    model = model.to(DEVICE).eval()
    img = torch.randn(2, 3, 56, 56, device=DEVICE)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(img)
        assert patch_swin(model) == 4
        after = model(img)
    assert rel_err(after, before) < 1e-4
    assert list(model.state_dict()) == keys
    assert unpatch_swin(model) == 4
