"""Triton helpers shared by the kernel families: masked tile loads and d-chunked dots."""
import triton
import triton.language as tl


@triton.jit
def chunked_dot(a_base, offs_a, mask_a, sa_t, sa_d, b_base, offs_b, mask_b, sb_t, sb_d, D,
            num_dk, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """A[offs_a, :D] @ B[offs_b, :D]ᵀ in fp32, looping over d in BLOCK_DK chunks."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for c in range(0, num_dk):
        offs_d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
        mask_d = offs_d < D
        a = tl.load(a_base + offs_a[:, None] * sa_t + offs_d[None, :] * sa_d,
                    mask=mask_a[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(b_base + offs_b[:, None] * sb_t + offs_d[None, :] * sb_d,
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc


@triton.jit
def load_tile(base, offs_t, mask_t, s_t, s_d, offs_c, mask_c, UPCAST: tl.constexpr):
    """Load base[offs_t, offs_c] (zero outside the masks), fp32 in the interpreter for bf16."""
    x = tl.load(base + offs_t[:, None] * s_t + offs_c[None, :] * s_d,
                mask=mask_t[:, None] & mask_c[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x
