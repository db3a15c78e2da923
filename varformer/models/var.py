"""VAR: the next-scale autoregressive transformer over the VQVAE's 10-scale token pyramid.

Tokens: [SOS; word_embed(teacher-forcing latents [B, 679, 32])] + lvl_embed + pos_1LC ->
[B, 680, C] -> depth × AdaLN self-attention blocks (conditioned on the class embedding) ->
AdaLN head -> logits [B, 680, V]. d16: C = 1024, 16 heads of 64; d20: C = 1280, 20 heads.
Attention: q and k l2-normalised, q scaled by a learnable per-head temperature
(exp(min(scale_mul, ln 100))), softmax scale 1; q and v biases, no k bias; block-causal mask
for teacher forcing (a token sees every token of its own and earlier scales). Inference runs the
scales one after another with key/value caches preallocated for the 680 tokens, classifier-free
guidance (batch doubled with the null class, t = cfg·si/9) and top-k / top-p sampling.

Parameter and buffer names equal VAR's (``checkpoints/var_d16_state_dict.tsv``), so
``var_d16.pth`` loads with strict=True.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varformer.ops.quantizer import VAR_PATCH_NUMS, MultiScaleQuantizer


class FFN(nn.Module):
    """Linear(C, 4C) → GELU(tanh) → Linear(4C, C)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with VAR's l2-normalised q/k and per-head temperature.

    forward(x [B, L, C], attn_bias [1, 1, L, L] or None) -> [B, L, C]. With ``kv_caching(True)``
    each call appends its keys/values to caches preallocated for ``max_len`` tokens and
    attends to everything cached so far."""

    def __init__(self, block_idx: int, embed_dim: int = 1024, num_heads: int = 16,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_l2_norm: bool = True,
                 max_len: int = 680):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"SelfAttention: num_heads={num_heads} must divide "
                             f"embed_dim={embed_dim}")
        self.block_idx, self.num_heads = block_idx, num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.max_len = max_len
        self.caching, self._k, self._v, self._n = False, None, None, 0

    def kv_caching(self, enable: bool) -> None:
        self.caching, self._k, self._v, self._n = enable, None, None, 0

    def forward(self, x: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)            # [B, H, L, hd]
        if self.attn_l2_norm:
            temp = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(temp)
            k = F.normalize(k, dim=-1)
        if self.caching and (k.requires_grad or v.requires_grad):
            # training through the AR loop: grow the cache by concatenation (no in-place writes
            # into tensors that autograd saved)
            if self._n:
                k, v = torch.cat((self._k, k), 2), torch.cat((self._v, v), 2)
            self._k, self._v, self._n = k, v, k.shape[2]
        elif self.caching:
            if (self._k is None or self._k.shape[0] != B or self._k.dtype != k.dtype
                    or self._k.shape[2] != self.max_len):
                shape = (B, self.num_heads, self.max_len, self.head_dim)
                self._k, self._v = k.new_empty(shape), v.new_empty(shape)
            if self._n + L > self.max_len:
                raise RuntimeError(f"SelfAttention: KV cache holds {self.max_len} tokens, "
                                   f"{self._n + L} requested")
            self._k[:, :, self._n:self._n + L] = k
            self._v[:, :, self._n:self._n + L] = v
            self._n += L
            k, v = self._k[:, :, :self._n], self._v[:, :, :self._n]
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class AdaLNSelfAttn(nn.Module):
    """x + γ1·Attn(LN(x)(1+s1)+b1), then x + γ2·FFN(LN(x)(1+s2)+b2); (γ1, γ2, s1, s2, b1, b2)
    from Linear(SiLU(cond)) [B, 6C]."""

    def __init__(self, block_idx: int, embed_dim: int, cond_dim: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, attn_l2_norm: bool = True,
                 max_len: int = 680):
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        self.drop_path_rate = drop_path
        self.attn = SelfAttention(block_idx, embed_dim, num_heads, attn_drop, drop,
                                  attn_l2_norm, max_len)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def _drop_path(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_path_rate == 0:
            return x
        keep = 1 - self.drop_path_rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: Tensor, cond_BD: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self._drop_path(self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(b1),
                                          attn_bias).mul_(g1))
        x = x + self._drop_path(self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(b2)).mul(g2))
        return x


class AdaLNBeforeHead(nn.Module):
    """LN(x)·(1 + scale) + shift with (scale, shift) = Linear(SiLU(cond)) [B, 2C]."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


def sample_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """logits [B, l, V] -> sampled indices [B, l]. top_k keeps the k largest logits, top_p the
    smallest set whose probability reaches top_p (the most likely token always stays);
    top_k = 1 is greedy (argmax, no randomness)."""
    if top_k == 1:
        return logits.argmax(-1)
    B, l, V = logits.shape
    logits = logits.float().clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1).view(-1, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, l)


class VAR(nn.Module):
    """VAR's transformer (defaults: d16). ``depth`` sets the size as VAR's builder does when
    ``embed_dim``/``num_heads`` are None: heads = depth, C = 64·depth."""

    def __init__(self, depth: int = 16, embed_dim: Optional[int] = None,
                 num_heads: Optional[int] = None, num_classes: int = 1000,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, cond_drop_rate: float = 0.1,
                 attn_l2_norm: bool = True, patch_nums: Sequence[int] = VAR_PATCH_NUMS,
                 Cvae: int = 32, vocab_size: int = 4096):
        super().__init__()
        C = embed_dim or 64 * depth
        H = num_heads or depth
        self.depth, self.C, self.D, self.num_heads = depth, C, C, H
        self.Cvae, self.V, self.num_classes = Cvae, vocab_size, num_classes
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends, cur = [], 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.prog_si = -1

        self.word_embed = nn.Linear(Cvae, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        std = math.sqrt(1 / C / 3)
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=std)
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=std)

        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(i, C, C, H, mlp_ratio, drop_rate, attn_drop_rate, dpr[i], norm_eps,
                          attn_l2_norm, self.L) for i in range(depth)])
        scale_of = torch.cat([torch.full((pn * pn,), i, dtype=torch.int64)
                              for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", scale_of[None].contiguous())
        d = scale_of.view(1, self.L, 1)
        mask = torch.where(d >= d.transpose(1, 2), 0.0, float("-inf"))
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, self.L, self.L).contiguous())
        self.head_nm = AdaLNBeforeHead(C, C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

    # ---- weights --------------------------------------------------------------------------------
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                     init_head: float = 0.02, init_std: float = -1.0) -> None:
        """VAR's initialisation (its builder's arguments as defaults)."""
        std = math.sqrt(1 / self.C / 3) if init_std < 0 else init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
            for b in self.blocks:
                b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                b.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
                w = b.ada_lin[-1].weight
                w[2 * self.C:].mul_(init_adaln)
                w[:2 * self.C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.zero_()

    # ---- teacher forcing -----------------------------------------------------------------------------
    def get_logits(self, h: Tensor, cond_BD: Tensor) -> Tensor:
        """Logits in fp32, also under autocast."""
        with torch.autocast(h.device.type, enabled=False):
            return self.head(self.head_nm(h.float(), cond_BD.float())).float()

    def embed_inputs(self, label_B: Tensor, x_BLCv_wo_first_l: Tensor):
        """-> (token embeddings [B, L, C] in fp32, condition [B, C])."""
        B = x_BLCv_wo_first_l.shape[0]
        with torch.autocast(x_BLCv_wo_first_l.device.type, enabled=False):
            cond = self.class_emb(label_B)
            sos = cond[:, None].expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
            x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        return x, cond

    def forward(self, label_B: Tensor, x_BLCv_wo_first_l: Tensor) -> Tensor:
        """Teacher forcing: labels [B] (1000 = unconditional), tokens [B, L − 1, Cvae] ->
        logits [B, L, V] (fp32). In training, labels drop to the null class with probability
        ``cond_drop_rate`` (classifier-free guidance training, as VAR)."""
        if x_BLCv_wo_first_l.dim() != 3 or x_BLCv_wo_first_l.shape[1:] != (self.L - self.first_l,
                                                                            self.Cvae):
            raise ValueError(f"VAR: teacher-forcing tokens must be [B, {self.L - self.first_l}, "
                             f"{self.Cvae}], got {tuple(x_BLCv_wo_first_l.shape)}")
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(label_B.shape[0], device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        x, cond = self.embed_inputs(label_B, x_BLCv_wo_first_l)
        bias = self.attn_bias_for_masking
        for b in self.blocks:
            x = b(x, cond, bias)
        return self.get_logits(x, cond)

    # ---- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B=None, quantizer: MultiScaleQuantizer = None,
                                 g_seed: Optional[int] = None, cfg: float = 1.5, top_k: int = 0,
                                 top_p: float = 0.0, return_indices: bool = False):
        """Sample B token pyramids scale by scale -> f_hat [B, Cvae, pn, pn] (decode it with
        ``VQVAE.fhat_to_img``). label_B: None (random classes), an int (< 0: unconditional) or
        [B] labels; guidance t = cfg·si/(SN−1) against the null class; top_k = 1 is greedy.
        With ``return_indices`` also the sampled indices per scale [B, pn²]."""
        if quantizer is None:
            raise ValueError("VAR.autoregressive_infer_cfg: pass the VQVAE's quantizer "
                             "(its codebook and φ build the next scale's input)")
        dev = self.pos_1LC.device
        gen = None if g_seed is None else torch.Generator(dev).manual_seed(g_seed)
        if label_B is None:
            label_B = torch.randint(0, self.num_classes, (B,), device=dev, generator=gen)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=dev)
        cond = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = (cond[:, None].expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, -1, -1)
             + lvl_pos[:, :self.first_l])
        pn_last = self.patch_nums[-1]
        f_hat = cond.new_zeros(B, self.Cvae, pn_last, pn_last)
        indices = []
        for b in self.blocks:
            b.attn.kv_caching(True)
        try:
            for si, pn in enumerate(self.patch_nums):
                h = x
                for b in self.blocks:
                    h = b(h, cond, None)
                logits = self.get_logits(h, cond)
                t = cfg * si / self.num_stages_minus_1
                logits = (1 + t) * logits[:B] - t * logits[B:]
                idx = sample_top_k_top_p(logits, top_k, top_p, gen)
                indices.append(idx)
                emb = quantizer.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat, nxt = quantizer.get_next_autoregressive_input(si, len(self.patch_nums),
                                                                     f_hat, emb)
                if si != self.num_stages_minus_1:
                    bg, ed = self.begin_ends[si + 1]
                    nxt = nxt.view(B, self.Cvae, -1).transpose(1, 2)
                    x = (self.word_embed(nxt) + lvl_pos[:, bg:ed]).repeat(2, 1, 1)
        finally:
            for b in self.blocks:
                b.attn.kv_caching(False)
        return (f_hat, indices) if return_indices else f_hat


def build_var(depth: int = 16, **kw) -> VAR:
    """VAR as VAR's builder makes it (heads = depth, C = 64·depth), with its initialisation."""
    model = VAR(depth=depth, **kw)
    model.init_weights()
    return model


__all__: List[str] = ["VAR", "AdaLNSelfAttn", "AdaLNBeforeHead", "SelfAttention", "FFN",
                      "sample_top_k_top_p", "build_var"]
