// Nearest-codebook lookup, CUDA implementation of varformer_ext::vq_lookup (float32 only).
//
//   z [N, C], codebook E [V, C], sqnorm [V]  ->  idx int64 [N], dist [N], codes [N, C] | [0, C]
//   d[n, v] = (|z_n|^2 + sqnorm[v]) - 2 * <z_n, E_v>,  idx[n] = argmin_v (lowest index on ties,
//   a NaN distance wins like torch.argmin).
//
// Only headers that the CPU torch wheel also ships (no c10/cuda, no ATen/cuda): the caller passes
// the current stream as an int64, and the device is made current with the CUDA runtime.
//
// Kernel: a block of 16 x 16 threads owns kBM tokens and walks a range of codes in tiles of kBN;
// z and codebook slices of kBK channels are staged through shared memory, each thread
// accumulates 4 tokens x 4 codes in registers and keeps a running (min, index) per token. A
// shuffle reduction over the 16 threads of a token row gives the block's answer. With few token
// blocks the codes are split over gridDim.y blocks, combined by a 64-bit atomicMin on a packed
// key (order-preserving bits of the distance, then the index), and a finish kernel unpacks them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "vq_lookup_checks.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace varformer_vq_cuda {
namespace {

constexpr int kBM = 64;        // tokens per block
constexpr int kBN = 64;        // codes per tile
constexpr int kBK = 16;        // channels per shared-memory stage
constexpr int kThreads = 256;  // 16 x 16; thread (ty, tx) owns tokens ty + 16 i, codes tx + 16 j
constexpr uint32_t kNoIndex = 0x7fffffffu;  // "no code seen"; larger than any valid index

// (a, ia) comes before (b, ib): NaN first, then the smaller distance, then the lower index.
__device__ __forceinline__ bool before(float a, uint32_t ia, float b, uint32_t ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && (!bn || ia < ib);
  return a < b || (a == b && ia < ib);
}

// Key whose unsigned order is the order of before(): distance bits in the high word (NaN -> 0,
// -0 -> +0, sign-magnitude -> monotone unsigned), index in the low word.
__device__ __forceinline__ unsigned long long pack_key(float d, uint32_t idx) {
  uint32_t u = 0;
  if (d == d) {
    u = __float_as_uint(d);
    if (u == 0x80000000u) u = 0;
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<unsigned long long>(u) << 32) | idx;
}

__device__ __forceinline__ float key_distance(unsigned long long key) {
  const uint32_t u = static_cast<uint32_t>(key >> 32);
  if (u == 0) return __uint_as_float(0x7fc00000u);  // NaN
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// grid (ceil(N / kBM), splits); block y covers codes [y * codes_per_split, +codes_per_split).
// kSplit: atomicMin into keys[N]; else write idx/dist (and codes if codes != nullptr).
// The min-blocks hint 2 lets ptxas use ~80 registers (with only kThreads, CUDA 13 ptxas capped
// the kernel at 48 registers and spilled).
template <bool kSplit>
__global__ void __launch_bounds__(kThreads, 2)
vq_tile_kernel(const float* __restrict__ z, const float* __restrict__ E,
               const float* __restrict__ sq, int64_t N, int64_t V, int64_t C,
               int64_t codes_per_split, unsigned long long* __restrict__ keys,
               int64_t* __restrict__ idx, float* __restrict__ dist,
               float* __restrict__ codes) {
  __shared__ float zs[kBK][kBM + 1];  // zs[k][m] = z[m0 + m, k0 + k]; +1 against bank conflicts
  __shared__ float es[kBK][kBN + 1];  // es[k][n] = E[n0 + n, k0 + k]
  __shared__ float zn[kBM];           // |z_m|^2

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int lane = tid % 32, warp = tid / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t vbeg = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t vend = vbeg + codes_per_split < V ? vbeg + codes_per_split : V;

  // Squared norms: warp w sums tokens w, w + 8, ... with its 32 lanes striding over C.
  for (int m = warp; m < kBM; m += kThreads / 32) {
    float s = 0.f;
    if (m0 + m < N) {
      const float* row = z + (m0 + m) * C;
      for (int64_t c = lane; c < C; c += 32) s = fmaf(row[c], row[c], s);
    }
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) zn[m] = s;
  }
  __syncthreads();

  // Running best per owned token; start at (+inf, first code this thread sees) so that a token
  // whose distances are all +inf still gets the lowest index.
  float best[4];
  uint32_t bidx[4];
  for (int i = 0; i < 4; ++i) {
    best[i] = __uint_as_float(0x7f800000u);
    bidx[i] = vbeg + tx < vend ? static_cast<uint32_t>(vbeg + tx) : kNoIndex;
  }

  for (int64_t n0 = vbeg; n0 < vend; n0 += kBN) {
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int64_t k0 = 0; k0 < C; k0 += kBK) {
      // Stage kBM x kBK of z and kBN x kBK of E (zero outside [N), [vend), [C)).
      for (int e = tid; e < kBM * kBK; e += kThreads) {
        const int r = e / kBK, k = e % kBK;
        const int64_t m = m0 + r, c = k0 + k;
        zs[k][r] = (m < N && c < C) ? z[m * C + c] : 0.f;
      }
      for (int e = tid; e < kBN * kBK; e += kThreads) {
        const int r = e / kBK, k = e % kBK;
        const int64_t n = n0 + r, c = k0 + k;
        es[k][r] = (n < vend && c < C) ? E[n * C + c] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = zs[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = es[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

    // Codes of this thread come in increasing order (tiles, then j): a strict '<' keeps the
    // lowest index; the first NaN replaces any number and is never replaced.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < vend) {
        const float s = sq[n];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float d = (zn[ty + 16 * i] + s) - 2.f * acc[i][j];
          if (d < best[i] || (d != d && best[i] == best[i])) {
            best[i] = d;
            bidx[i] = static_cast<uint32_t>(n);
          }
        }
      }
    }
  }

  // Reduce over the 16 threads of each token row (lanes 0-15 and 16-31 of a warp).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float v = best[i];
    uint32_t ix = bidx[i];
    for (int off = 8; off > 0; off /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const uint32_t oi = __shfl_xor_sync(0xffffffffu, ix, off);
      if (before(ov, oi, v, ix)) { v = ov; ix = oi; }
    }
    const int64_t m = m0 + ty + 16 * i;
    if (m >= N) continue;
    if (kSplit) {
      if (tx == 0) atomicMin(keys + m, pack_key(v, ix));
    } else {
      if (tx == 0) {
        idx[m] = static_cast<int64_t>(ix);
        dist[m] = v;
      }
      if (codes != nullptr)
        for (int64_t c = tx; c < C; c += 16) codes[m * C + c] = E[static_cast<int64_t>(ix) * C + c];
    }
  }
}

// One warp per token: unpack keys[m] into idx/dist, copy the code row.
__global__ void vq_finish_kernel(const unsigned long long* __restrict__ keys,
                                 const float* __restrict__ E, int64_t N, int64_t V, int64_t C,
                                 int64_t* __restrict__ idx, float* __restrict__ dist,
                                 float* __restrict__ codes) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (m >= N) return;
  const unsigned long long key = keys[m];
  const int64_t ix = static_cast<int64_t>(key & 0xffffffffull);
  if (lane == 0) {
    idx[m] = ix;
    dist[m] = key_distance(key);
  }
  if (codes != nullptr && ix < V)  // ix < V always holds: every split saw a code of token m
    for (int64_t c = lane; c < C; c += 32) codes[m * C + c] = E[ix * C + c];
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "vq_lookup (CUDA): ", what, " failed: ",
              cudaGetErrorString(err));
}

// Makes `device` current for its lifetime and restores the previous device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaError_t err = cudaGetDevice(&prev_);
    TORCH_CHECK(err == cudaSuccess, "vq_lookup (CUDA): cudaGetDevice failed: ",
                cudaGetErrorString(err));
    if (prev_ != device) {
      err = cudaSetDevice(device);
      TORCH_CHECK(err == cudaSuccess, "vq_lookup (CUDA): cudaSetDevice(", device, ") failed: ",
                  cudaGetErrorString(err));
    }
    device_ = device;
  }
  ~DeviceScope() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
  int device_ = 0;
};

int sm_count(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();  // clear; fall back to a typical count
    sms = 108;
  }
  return sms;
}

void check_inputs(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm) {
  varformer_vq_checks::check_common(z, codebook, sqnorm);
  TORCH_CHECK(z.scalar_type() == at::kFloat, "vq_lookup (CUDA): z must be float32, got ",
              z.scalar_type());
  TORCH_CHECK(z.is_cuda(), "vq_lookup (CUDA): z must be a CUDA tensor, got ", z.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_lookup_cuda(
    const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, bool with_codes,
    int64_t cuda_stream) {
  check_inputs(z, codebook, sqnorm);
  const int64_t N = z.size(0), C = z.size(1), V = codebook.size(0);
  const int device = z.device().index();
  DeviceScope scope(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(cuda_stream));

  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z.options());
  at::Tensor codes = at::empty({with_codes ? N : 0, C}, z.options());
  if (N == 0) return {idx, dist, codes};

  const float* zp = z.data_ptr<float>();
  const float* ep = codebook.data_ptr<float>();
  const float* sp = sqnorm.data_ptr<float>();
  float* cp = with_codes ? codes.data_ptr<float>() : nullptr;

  // Token blocks; with fewer than ~2 per SM, split the code tiles over gridDim.y.
  const int64_t mblocks = (N + kBM - 1) / kBM;
  TORCH_CHECK(mblocks <= std::numeric_limits<int32_t>::max(), "vq_lookup (CUDA): N too large");
  const int64_t ntiles = (V + kBN - 1) / kBN;
  const int64_t target = 2 * static_cast<int64_t>(sm_count(device));
  int64_t splits = 1;
  if (mblocks < target) splits = std::min(ntiles, (target + mblocks - 1) / mblocks);
  const int64_t tiles_per_split = (ntiles + splits - 1) / splits;
  splits = (ntiles + tiles_per_split - 1) / tiles_per_split;
  const int64_t codes_per_split = tiles_per_split * kBN;
  const dim3 grid(static_cast<unsigned>(mblocks), static_cast<unsigned>(splits));

  if (splits == 1) {
    vq_tile_kernel<false><<<grid, kThreads, 0, stream>>>(
        zp, ep, sp, N, V, C, codes_per_split, nullptr, idx.data_ptr<int64_t>(),
        dist.data_ptr<float>(), cp);
    check_launch("vq_tile_kernel launch");
    return {idx, dist, codes};
  }

  at::Tensor keys = at::empty({N}, z.options().dtype(at::kLong));
  auto* kp = reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>());
  const cudaError_t err = cudaMemsetAsync(kp, 0xff, sizeof(unsigned long long) * N, stream);
  TORCH_CHECK(err == cudaSuccess, "vq_lookup (CUDA): cudaMemsetAsync failed: ",
              cudaGetErrorString(err));
  vq_tile_kernel<true><<<grid, kThreads, 0, stream>>>(zp, ep, sp, N, V, C, codes_per_split,
                                                      kp, nullptr, nullptr, nullptr);
  check_launch("vq_tile_kernel (split) launch");
  constexpr int kFinishWarps = 8;
  const int64_t fblocks = (N + kFinishWarps - 1) / kFinishWarps;
  vq_finish_kernel<<<static_cast<unsigned>(fblocks), 32 * kFinishWarps, 0, stream>>>(
      kp, ep, N, V, C, idx.data_ptr<int64_t>(), dist.data_ptr<float>(), cp);
  check_launch("vq_finish_kernel launch");
  return {idx, dist, codes};
}

}  // namespace
}  // namespace varformer_vq_cuda

TORCH_LIBRARY_IMPL(varformer_ext, CUDA, m) {
  m.impl("vq_lookup", &varformer_vq_cuda::vq_lookup_cuda);
}
