// The body of capability/*.cpp: every kernel of this directory, compiled for the
// capability that the including file selected, gathered into its Kernels table.
// The table is constant-initialized (plain function pointers): no code of this
// capability runs until kernels() has chosen it.
#pragma once

#include "cpu/bernoulli_nll_kernel.h"
#include "cpu/continuous_bernoulli_nll_kernel.h"
#include "cpu/gaussian_nll_kernel.h"
#include "cpu/kl_kernel.h"
#include "cpu/likelihood_kernel.h"
#include "cpu/reparameterize_kernel.h"
#include "cpu/row_ops_kernel.h"

#define VAEKERN_STR2(x) #x
#define VAEKERN_STR(x) VAEKERN_STR2(x)

namespace vaekern::cpu::CPU_CAPABILITY {

extern const Kernels kKernels;
const Kernels kKernels = {
    .name = VAEKERN_STR(CPU_CAPABILITY),
    .bernoulli_nll = {&likelihood_kernel<BernoulliNll<false>>, &likelihood_kernel<BernoulliNll<true>>},
    .bernoulli_nll_scale_rows = {&scale_rows_kernel<BernoulliNll<false>>, &scale_rows_kernel<BernoulliNll<true>>},
    .gaussian_nll = &likelihood_kernel<GaussianNll>,
    .gaussian_nll_scale_rows = &scale_rows_kernel<GaussianNll>,
    .continuous_bernoulli_nll = {&likelihood_kernel<ContinuousBernoulliNll<false>>,
                                 &likelihood_kernel<ContinuousBernoulliNll<true>>},
    .continuous_bernoulli_nll_scale_rows = {&scale_rows_kernel<ContinuousBernoulliNll<false>>,
                                            &scale_rows_kernel<ContinuousBernoulliNll<true>>},
    .gaussian_kl = &gaussian_kl_kernel,
    .gaussian_kl_backward = &gaussian_kl_backward_kernel,
    .gaussian_kl_columns = &gaussian_kl_columns_kernel,
    .reparameterize = &reparameterize_kernel,
    .reparameterize_backward = &reparameterize_backward_kernel,
};

}  // namespace vaekern::cpu::CPU_CAPABILITY
