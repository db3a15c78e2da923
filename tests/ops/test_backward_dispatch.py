"""A backward differentiates the path its forward ran: the backend request (use_fused_kernels,
VARFORMER_BACKEND) is taken when the forward runs, not when ``backward()`` is called."""
import importlib

import pytest
import torch

from varformer.ops import _dispatch

mam = importlib.import_module("varformer.ops.mediator_attention")   # the modules, not the
wam = importlib.import_module("varformer.ops.window_attention")     # functions of that name


def _mediator_loss():
    g = torch.Generator().manual_seed(0)
    q, m, k, v = (torch.randn(1, 2, n, 20, generator=g, dtype=torch.float64, requires_grad=True)
                  for n in (9, 5, 9, 9))
    return mam.mediator_attention(q, m, k, v).square().sum(), (q, m, k, v)


def _window_loss():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 8, 4, 3 * 8, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(49, 2, generator=g, dtype=torch.float64, requires_grad=True)
    return wam.window_attention(qkv, table, window_size=4, shift_size=2, num_heads=2).square().sum(), (qkv, table)


OPS = {"mediator": (mam, _mediator_loss), "window": (wam, _window_loss)}


def _spy(module, monkeypatch):
    ran = []
    for name, fn in list(module._BWD.items()):
        def wrapped(*args, _fn=fn, _name=name):
            ran.append(_name)
            return _fn(*args)
        monkeypatch.setitem(module._BWD, name, wrapped)
    return ran


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("fused_forward", [False, True])
def test_backward_runs_the_forward_path(op, fused_forward, monkeypatch):
    module, loss_fn = OPS[op]
    monkeypatch.delenv("VARFORMER_BACKEND", raising=False)
    ran = _spy(module, monkeypatch)
    with _dispatch.use_fused_kernels(fused_forward):
        loss, inputs = loss_fn()
    with _dispatch.use_fused_kernels(not fused_forward):    # the opposite request at backward
        grads = torch.autograd.grad(loss, inputs)
    assert ran == ["cpu" if fused_forward else "reference"]
    with _dispatch.use_fused_kernels(False):                # and the gradients are right
        ref_loss, ref_inputs = loss_fn()
        want = torch.autograd.grad(ref_loss, ref_inputs)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref)


def test_bad_request_names_the_op():
    with pytest.raises(ValueError, match="window_attention.*'fast'.*auto, triton, reference"):
        _dispatch.select("window_attention", torch.zeros(1), want="fast")
