// Input checks shared by the CPU and CUDA kernels of varformer_ext::vq_lookup.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>

namespace varformer_vq_checks {

// z [N, C], codebook [V, C], sqnorm [V]: ranks, sizes, one dtype, contiguity, one device.
// With allow_empty_sqnorm (the CPU kernel), sqnorm may also be [0]: computed from the codebook.
inline void check_common(const at::Tensor& z, const at::Tensor& codebook,
                         const at::Tensor& sqnorm, bool allow_empty_sqnorm = false) {
  TORCH_CHECK(z.dim() == 2, "vq_lookup: z must be 2-D [N, C], got ", z.dim(), " dims");
  TORCH_CHECK(codebook.dim() == 2, "vq_lookup: codebook must be 2-D [V, C], got ",
              codebook.dim(), " dims");
  TORCH_CHECK(sqnorm.dim() == 1, "vq_lookup: sqnorm must be 1-D [V], got ", sqnorm.dim(),
              " dims");
  TORCH_CHECK(z.size(1) == codebook.size(1), "vq_lookup: z has C=", z.size(1),
              " channels but codebook has C=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, "vq_lookup: codebook is empty (V=0)");
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max(),
              "vq_lookup: codebook has more than 2^31-1 codes");
  TORCH_CHECK(sqnorm.size(0) == codebook.size(0) || (allow_empty_sqnorm && sqnorm.size(0) == 0),
              "vq_lookup: sqnorm has ", sqnorm.size(0), " entries but codebook has V=",
              codebook.size(0), " codes", allow_empty_sqnorm ? " (or pass [0] to compute it)" : "");
  TORCH_CHECK(codebook.scalar_type() == z.scalar_type(), "vq_lookup: codebook dtype ",
              codebook.scalar_type(), " differs from z dtype ", z.scalar_type());
  TORCH_CHECK(sqnorm.scalar_type() == z.scalar_type(), "vq_lookup: sqnorm dtype ",
              sqnorm.scalar_type(), " differs from z dtype ", z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), "vq_lookup: z must be contiguous");
  TORCH_CHECK(codebook.is_contiguous(), "vq_lookup: codebook must be contiguous");
  TORCH_CHECK(sqnorm.is_contiguous(), "vq_lookup: sqnorm must be contiguous");
  TORCH_CHECK(codebook.device() == z.device(), "vq_lookup: codebook is on ",
              codebook.device(), " but z is on ", z.device());
  TORCH_CHECK(sqnorm.device() == z.device(), "vq_lookup: sqnorm is on ", sqnorm.device(),
              " but z is on ", z.device());
}

}  // namespace varformer_vq_checks
