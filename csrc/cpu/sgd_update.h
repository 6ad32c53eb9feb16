// The per-element SGD update of the CPU kernels, shared by the dense step (sgd.cpp) and the
// row-wise step of sparse gradients (sgd_sparse.cpp), so both apply one formula in one order.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <optional>

namespace fastcore5 {
namespace cpu_sgd {

// One step's coefficients, broadcast once per call. acc_t: float, or double for fp64 tensors.
template <typename acc_t>
struct Update {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec lr, scale, momentum, keep, weight_decay, decay;  // keep = 1 - dampening; decay = 1 - lr*wd
  bool has_scale, maximize, has_weight_decay, decoupled, has_momentum, first_step, nesterov;

  // ``grad`` comes in as stored and leaves unscaled (the value written back with a GradScaler);
  // ``buf`` is read only after the first step.
  void apply(Vec& p, Vec& grad, Vec& buf) const {
    if (has_scale) grad = grad / scale;
    Vec g = maximize ? grad.neg() : grad;
    if (has_weight_decay) {
      if (decoupled) {
        p = p * decay;
      } else {
        g = g + weight_decay * p;
      }
    }
    if (has_momentum) {
      buf = first_step ? g : momentum * buf + keep * g;
      g = nesterov ? g + momentum * buf : buf;
    }
    p = p - lr * g;
  }

  // A row that a sparse gradient does not hold (sgd_sparse.cpp), stepped as torch.optim.SGD steps
  // it: torch keeps the buffer sparse, so the row's buffer is scaled (momentum*buf, no zero added)
  // and applied; on the first step the row has no buffer yet (0 here) and does not move. L2 weight
  // decay is refused with sparse gradients; decoupled decay scales every row.
  void apply_absent(Vec& p, Vec& buf) const {
    if (has_weight_decay && decoupled) p = p * decay;
    if (!has_momentum) return;
    if (first_step) {
      buf = Vec(0);
      return;
    }
    buf = momentum * buf;
    p = p - lr * (nesterov ? momentum * buf : buf);
  }
};

// The value of a one-element floating tensor (checked by check_sgd_arguments) on the host.
inline double read_scalar(const at::Tensor& t) {
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sgd_step", [&] {
    value = static_cast<double>(*t.const_data_ptr<scalar_t>());
  });
  return value;
}

template <typename acc_t>
Update<acc_t> make_update(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                          bool maximize, bool decoupled_weight_decay, bool first_step,
                          const std::optional<at::Tensor>& grad_scale) {
  Update<acc_t> u;
  // The products below in acc_t, as the GPU kernel forms them per element.
  const acc_t lr_acc = static_cast<acc_t>(lr), wd_acc = static_cast<acc_t>(weight_decay);
  u.lr = lr_acc;
  u.has_scale = grad_scale.has_value();
  u.scale = u.has_scale ? static_cast<acc_t>(read_scalar(*grad_scale)) : acc_t(1);
  u.momentum = static_cast<acc_t>(momentum);
  u.keep = static_cast<acc_t>(1.0 - dampening);
  u.weight_decay = wd_acc;
  u.decay = acc_t(1) - lr_acc * wd_acc;
  u.has_weight_decay = weight_decay != 0.0;
  u.decoupled = decoupled_weight_decay;
  u.has_momentum = momentum != 0.0;
  u.first_step = first_step;
  u.nesterov = nesterov && u.has_momentum;
  u.maximize = maximize;
  return u;
}

}  // namespace cpu_sgd
}  // namespace fastcore5
