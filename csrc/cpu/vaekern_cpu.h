// Shared declarations of the fused CPU kernels (csrc/cpu).
//
// Design
// ------
// Two layers, as in PyTorch's own aten/src/ATen/native/cpu:
//
// * host code: one file per op (bernoulli_nll.cpp, gaussian_nll.cpp,
//   continuous_bernoulli_nll.cpp, gaussian_kl.cpp, reparameterize.cpp, vae_loss.cpp) for
//   its checks, outputs and TORCH_LIBRARY_IMPL(vaekern, CPU, m), over
//   shared files named for their job: checks.h (argument checks), allocation.h (outputs
//   on huge pages), row_ops.h (task grain, upstream gradients per row, the fixed-order
//   reductions, scale_rows_), likelihood.h (the likelihood term's row sums and gradient)
//   and kl.h (the KL term's row sums and gradients). Each runs at::parallel_for over a
//   fixed task grid.
// * vectorized loops over raw pointers (<name>_kernel.h), compiled once per CPU
//   capability by capability/{default,avx2,avx512}.cpp into a table of function pointers
//   (struct Kernels, filled in kernel_table.h). kernels() picks the table at the first
//   call from at::get_cpu_capability(), so one build runs everywhere and
//   ATEN_CPU_CAPABILITY=avx2 or =default forces a narrower one, exactly as it does for
//   PyTorch's kernels.
//
// A likelihood is one element functor: the loops of likelihood_kernel.h and
// row_ops_kernel.h are templated on it (their headers say what the functor provides), and
// <op>_kernel.h holds each one's (bernoulli_nll, gaussian_nll, continuous_bernoulli_nll).
// A new likelihood adds its functor, its reference, its two entries in Kernels and the op
// that calls likelihood_rows with it; tiling, partial sums, row scaling and the KL are
// reused as they are. A functor may take one per-column parameter (ColumnParam: the
// Gaussian's log_scale), which the loops load next to input and target.
//
// Determinism: a row is split into column chunks of a fixed size (kChunk); each
// (row, chunk) task sums into its own double partial, and the host adds the partials
// of a row, then the rows, in index order. No result depends on the thread count
// (results may differ in the last bits between capabilities: 16 vs 8 lanes).
//
// The capability tables hold only plain function pointers, so they are constant-
// initialized: no AVX code runs while the library loads.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace vaekern::cpu {

// Columns of one row that one task handles. Fixed: it sets the summation order.
constexpr int64_t kChunk = 8192;
// Elements of the flattened latents that one reparameterize task handles; a multiple of
// 4 because one Philox-4x32 block gives 4 normals.
constexpr int64_t kNoiseBlock = 1024;

inline int64_t num_chunks(int64_t cols) { return cols <= kChunk ? 1 : (cols + kChunk - 1) / kChunk; }

// A per-column parameter of a likelihood (the Gaussian's log_scale): one value per column
// of the flattened row, in the arithmetic type of the loop that reads it (LikelihoodArgs::
// acc_dtype; float for ScaleRowsArgs' float16 recompute), or one value for every column
// (stride 0). data is nullptr for a likelihood without one.
struct ColumnParam {
  const void* data = nullptr;  // [cols] (stride 1) or [1] (stride 0)
  int64_t stride = 0;
};

struct LikelihoodArgs {
  const void* input;          // [rows, cols] decoder output (logits, probabilities, ...)
  c10::ScalarType input_dtype;  // float, double, bfloat16, half
  const void* target;         // [rows, cols]
  c10::ScalarType target_dtype;  // any of the above, bool, uint8
  void* grad;                 // [rows, cols] input dtype, or nullptr: no gradient
  double* partials;           // [rows, chunks] per-chunk sums of the element values
  int64_t rows, cols, chunks;
  double grad_scale;          // 1, or 1/B for reduction=mean
  c10::ScalarType acc_dtype;  // float or double: the element math and the sums
  ColumnParam param = {};     // for a functor that takes one (likelihood_kernel.h), in acc_dtype
};

// Tasks are (row, chunk) pairs in row-major order, [begin, end).
using LikelihoodKernel = void (*)(const LikelihoodArgs&, int64_t begin, int64_t end);

struct ScaleRowsArgs {
  void* grad;                 // [rows, cols], scaled in place
  c10::ScalarType dtype;
  const double* scale;        // [rows]; a row whose scale is exactly 1 is skipped
  int64_t rows, cols, chunks;
  // float16 grad only, else nullptr: the likelihood's (input, target), contiguous [rows,
  // cols], from which an element outside float16's normal range (inf or subnormal: its
  // forward value for an upstream of 1 overflowed or lost bits) is recomputed, times
  // grad_scale (1, or 1/B for mean) and the row's scale (row_ops_kernel.h).
  const void* input = nullptr;
  const void* target = nullptr;
  c10::ScalarType target_dtype = c10::ScalarType::Float;
  double grad_scale = 1.0;
  ColumnParam param = {};     // float16 grad only, as input: the likelihood's parameter
};

// Tasks are (row, chunk) pairs in row-major order, [begin, end).
using ScaleRowsKernel = void (*)(const ScaleRowsArgs&, int64_t begin, int64_t end);

// A part of the KL term's prior (its mean or log-variance): the [rows, cols] view of it
// broadcast to the latents, at its strides (0 along a broadcast dim), in the latents'
// arithmetic type (float; double for double latents). data is nullptr where it is absent.
struct PriorOperand {
  const void* data;
  int64_t row_stride, col_stride;
};

struct GaussianKlArgs {
  const void* mu;             // [rows, cols]
  const void* logvar;         // [rows, cols]
  c10::ScalarType dtype;
  int64_t rows, cols;
  PriorOperand prior_mu;      // both directions: the prior N(prior_mu, exp(prior_logvar))
  PriorOperand prior_logvar;
  c10::ScalarType acc_dtype;  // forward: float or double, the element math (and the sums)
  bool wide_sums;             // forward: mu^2 and the sums in double whatever acc_dtype
  double* out;                // forward: [rows] row sums of the KL, or [cols] column sums (KL_COLUMNS)
  const double* scale;        // backward: [rows] d(loss)/d(row KL), or [cols] per column (per_column)
  bool per_column;            // backward: scale is per column (the KL_COLUMNS reduction's upstream)
  void* grad_mu;              // backward: [rows, cols]
  void* grad_logvar;          // backward: [rows, cols]
  void* grad_prior_mu;        // backward: [rows, cols] per element, the prior's type (if present)
  void* grad_prior_logvar;    // backward: likewise
};

struct ReparameterizeArgs {
  const void* mu;             // [n] forward only
  const void* logvar;         // [n]
  const void* eps;            // [n], or nullptr: Philox noise keyed on (seed, index)
  c10::ScalarType dtype;
  uint64_t seed;
  int64_t n;
  void* z;                    // forward: [n]
  const void* grad_z;         // backward: [n]
  void* grad_logvar;          // backward: [n]
};

struct Kernels {
  const char* name;
  // Indexed by from_logits: [0] probabilities, [1] logits.
  LikelihoodKernel bernoulli_nll[2];
  // The backward of a saved Bernoulli gradient (same index): its rows scaled in place.
  ScaleRowsKernel bernoulli_nll_scale_rows[2];
  // Its per-column parameter is log_scale (LikelihoodArgs::param, ScaleRowsArgs::param).
  LikelihoodKernel gaussian_nll;
  ScaleRowsKernel gaussian_nll_scale_rows;
  // Indexed by from_logits, as the Bernoulli's.
  LikelihoodKernel continuous_bernoulli_nll[2];
  ScaleRowsKernel continuous_bernoulli_nll_scale_rows[2];
  // Tasks are rows.
  void (*gaussian_kl)(const GaussianKlArgs&, int64_t begin, int64_t end);
  void (*gaussian_kl_backward)(const GaussianKlArgs&, int64_t begin, int64_t end);
  // Tasks are columns (each over every row).
  void (*gaussian_kl_columns)(const GaussianKlArgs&, int64_t begin, int64_t end);
  // Tasks are blocks of kNoiseBlock elements.
  void (*reparameterize)(const ReparameterizeArgs&, int64_t begin, int64_t end);
  void (*reparameterize_backward)(const ReparameterizeArgs&, int64_t begin, int64_t end);
};

// The table for this machine's CPU capability (see the header comment).
const Kernels& kernels();

namespace DEFAULT { extern const Kernels kKernels; }
namespace AVX2 { extern const Kernels kKernels; }
namespace AVX512 { extern const Kernels kKernels; }

}  // namespace vaekern::cpu
