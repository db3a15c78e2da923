"""MediatorAttention (the AFT drop-in) against an eager implementation of the official block."""
import pytest
import torch
from torch import nn

from tests.conftest import DEVICE, rel_err, triton_usable
from varformer.ops import MediatorAttention, mediator_attention_official

# Released checkpoint, keys under Mainencoder.AFT.Level_1 (C = 160), with their shapes.
OFFICIAL_LEVEL1 = {
    "proj_out.weight": (160, 160, 1, 1), "proj_out.bias": (160,),
    "norm_q.weight": (160,), "norm_q.bias": (160,),
    "q.weight": (160, 160, 1, 1), "q.bias": (160,),
    "norm_kv.weight": (160,), "norm_kv.bias": (160,),
    "kv.weight": (320, 160, 1, 1), "kv.bias": (320,),
    "norm_a.weight": (320,), "norm_a.bias": (320,),
    "a.weight": (160, 320, 4, 4), "a.bias": (160,),
}


class EagerAnchorCrossAttnBlock(nn.Module):
    """The official block as the official code computes it (GroupNorm(32, eps 1e-6), 1×1 convs,
    4×4 stride-4 mediator conv, single head, scale C^-1/2, maps materialised)."""

    def __init__(self, c):
        super().__init__()
        gn = lambda n: nn.GroupNorm(32, n, eps=1e-6, affine=True)  # noqa: E731
        self.proj_out = nn.Conv2d(c, c, 1)
        self.norm_q, self.q = gn(c), nn.Conv2d(c, c, 1)
        self.norm_kv, self.kv = gn(c), nn.Conv2d(c, 2 * c, 1)
        self.norm_a, self.a = gn(2 * c), nn.Conv2d(2 * c, c, 4, stride=4)

    def forward(self, x, p):
        B, C, H, W = x.shape
        q = self.q(self.norm_q(x)).reshape(B, C, H * W)
        k, v = self.kv(self.norm_kv(p)).reshape(B, 2, C, H * W).unbind(1)
        a = self.a(self.norm_a(torch.cat([x, p], 1))).reshape(B, C, -1)
        h = mediator_attention_official(q, a, k, v, int(C) ** -0.5)
        return x + self.proj_out(h.reshape(B, C, H, W))


@pytest.fixture(autouse=True)
def _exact_convs(monkeypatch):
    """cuDNN convolutions default to TF32 on GPUs; the parity checks need fp32 convs."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"], indirect=True)
@pytest.mark.parametrize("C, H, W", [(64, 12, 20), (32, 8, 8)])
def test_module_matches_official_block(backend, C, H, W):
    ours, official = MediatorAttention(C).to(DEVICE), EagerAnchorCrossAttnBlock(C).to(DEVICE)
    _randomise(official)
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, C, H, W, device=DEVICE, requires_grad=True)
    p = torch.randn(2, C, H, W, device=DEVICE, requires_grad=True)
    out = ours(x, p)
    official64 = EagerAnchorCrossAttnBlock(C).to(DEVICE).double()
    official64.load_state_dict(official.state_dict())
    x64, p64 = (t.detach().double().requires_grad_() for t in (x, p))
    ref = official64(x64, p64)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    assert rel_err(x.grad, x64.grad) < 1e-4 and rel_err(p.grad, p64.grad) < 1e-4
    ref_params = dict(official64.named_parameters())
    for n, a in ours.named_parameters():
        assert rel_err(a.grad, ref_params[n].grad) < 1e-4, n


def test_official_state_dict_loads_strictly():
    m = MediatorAttention(160)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == OFFICIAL_LEVEL1
    released = {k: torch.randn(s) for k, s in OFFICIAL_LEVEL1.items()}
    m.load_state_dict(released, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict({k: v for k, v in released.items() if k != "a.bias"}, strict=True)


@pytest.mark.parametrize("backend", ["reference", "auto"], indirect=True)
def test_multi_head_splits_channels(backend):
    torch.manual_seed(1)
    m = MediatorAttention(64, num_heads=4)
    _randomise(m)
    x, p = torch.randn(1, 64, 8, 12), torch.randn(1, 64, 8, 12)
    q = m.q(m.norm_q(x)).reshape(1, 4, 16, -1).transpose(-1, -2)
    k, v = (t.reshape(1, 4, 16, -1).transpose(-1, -2) for t in m.kv(m.norm_kv(p)).chunk(2, 1))
    a = m.a(m.norm_a(torch.cat([x, p], 1))).reshape(1, 4, 16, -1).transpose(-1, -2)
    s = torch.softmax(a @ k.mT / 4, -1) @ v
    y = (torch.softmax(q @ a.mT / 4, -1) @ s).transpose(-1, -2).reshape(1, 64, 8, 12)
    assert rel_err(m(x, p), x + m.proj_out(y)) < 1e-5


def test_module_errors():
    m = MediatorAttention(32)
    with pytest.raises(ValueError, match="multiples of stride=4"):
        m(torch.randn(1, 32, 10, 8), torch.randn(1, 32, 10, 8))
    with pytest.raises(ValueError, match="share batch and spatial size"):
        m(torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 12))
    with pytest.raises(ValueError, match="32 channels"):
        m(torch.randn(1, 16, 8, 8), torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="4 dims"):
        m(torch.randn(32, 8, 8), torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="must divide dim"):
        MediatorAttention(64, num_heads=3)


@pytest.mark.skipif(not triton_usable(), reason="Triton unusable here")
def test_module_backends_agree(monkeypatch):
    m = MediatorAttention(32).to(DEVICE)
    _randomise(m)
    x, p = torch.randn(1, 32, 8, 16, device=DEVICE), torch.randn(1, 32, 8, 16, device=DEVICE)
    outs = {}
    for b in ("reference", "triton", "auto"):
        monkeypatch.setenv("VARFORMER_BACKEND", b)
        outs[b] = m(x, p)
    assert rel_err(outs["triton"], outs["reference"]) < 1e-5
    assert rel_err(outs["auto"], outs["reference"]) < 1e-5
