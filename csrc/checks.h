// Argument checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of every op, so the
// two backends accept and refuse exactly the same calls with the same messages. Host code only
// (no device code): included by .cpp and .cu files alike.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace mnemo_fast {

// float64 stays float64; every other floating dtype accumulates (and computes eta) in float32.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// perturb_*: forget[l] and remain[l] are floating, of one shape, all on forget[0]'s device.
inline void check_fishers(const char* op, at::TensorList forget, at::TensorList remain) {
  TORCH_CHECK(forget.size() == remain.size(), op, ": forget and remain must have the same length, ",
              "got ", forget.size(), " and ", remain.size());
  for (size_t l = 0; l < forget.size(); ++l) {
    TORCH_CHECK(at::isFloatingType(forget[l].scalar_type()) &&
                    at::isFloatingType(remain[l].scalar_type()),
                op, ": forget[", l, "] (", forget[l].scalar_type(), ") and remain[", l, "] (",
                remain[l].scalar_type(), ") must be floating point");
    TORCH_CHECK(forget[l].device() == forget[0].device() && remain[l].device() == forget[0].device(),
                op, ": forget[", l, "] (", forget[l].device(), ") and remain[", l, "] (",
                remain[l].device(), ") must be on device ", forget[0].device());
    TORCH_CHECK(forget[l].sizes() == remain[l].sizes(), op, ": forget[", l, "] ", forget[l].sizes(),
                " and remain[", l, "] ", remain[l].sizes(), " must have the same shape");
  }
}

// perturb_max_ratio returns one tensor: every Fisher must compute in forget[0]'s dtype.
// Returns that dtype (float32 for an empty list).
inline at::ScalarType check_max_ratio_dtypes(at::TensorList forget) {
  if (forget.empty()) return at::kFloat;
  const at::ScalarType dtype = accumulate_dtype(forget[0].scalar_type());
  for (size_t l = 0; l < forget.size(); ++l) {
    TORCH_CHECK(accumulate_dtype(forget[l].scalar_type()) == dtype, "perturb_max_ratio: forget[",
                l, "] (", forget[l].scalar_type(), ") must be float64 exactly when forget[0] is (",
                forget[0].scalar_type(), ")");
  }
  return dtype;
}

// perturb_shift_ / perturb_gaussian_: params against the (already checked) Fishers and the
// per-tensor max_ratio [L]; params are updated in place, hence contiguous.
// The parameters a perturb_* op edits in place: one per Fisher, same shape and device,
// floating point, contiguous.
inline void check_param_list(const char* op, at::TensorList params, at::TensorList forget) {
  TORCH_CHECK(params.size() == forget.size(), op, ": params and forget must have the same length, ",
              "got ", params.size(), " and ", forget.size());
  for (size_t l = 0; l < params.size(); ++l) {
    TORCH_CHECK(params[l].sizes() == forget[l].sizes(), op, ": params[", l, "] ", params[l].sizes(),
                " and forget[", l, "] ", forget[l].sizes(), " must have the same shape");
    TORCH_CHECK(at::isFloatingType(params[l].scalar_type()), op, ": params[", l,
                "] must be floating point, got ", params[l].scalar_type());
    TORCH_CHECK(params[l].is_contiguous(), op, ": params[", l, "] must be contiguous (it is ",
                "updated in place)");
    TORCH_CHECK(params[l].device() == forget[l].device(), op, ": params[", l, "] (",
                params[l].device(), ") must be on the Fishers' device ", forget[l].device());
  }
}

// check_param_list, and max_ratio [L] (floating point, on the parameters' device).
inline void check_params(const char* op, at::TensorList params, at::TensorList forget,
                         const at::Tensor& max_ratio) {
  check_param_list(op, params, forget);
  TORCH_CHECK(max_ratio.dim() == 1 && max_ratio.size(0) == static_cast<int64_t>(params.size()),
              op, ": max_ratio must have shape [", params.size(), "], got ", max_ratio.sizes());
  TORCH_CHECK(at::isFloatingType(max_ratio.scalar_type()), op,
              ": max_ratio must be floating point, got ", max_ratio.scalar_type());
  if (!params.empty()) {
    TORCH_CHECK(max_ratio.device() == params[0].device(), op, ": max_ratio (", max_ratio.device(),
                ") must be on ", params[0].device());
  }
}

// A random generator fits tensors on `device` when it has the same device type and either names
// no index (torch.Generator("cuda") has index -1: like ATen's own random ops, it then serves any
// device of its type) or names device's index.
inline bool generator_fits(const at::Device& generator, const at::Device& device) {
  return generator.type() == device.type() &&
         (!generator.has_index() || generator.index() == device.index());
}

inline void check_generator_device(const char* op, const at::Device& generator,
                                   const at::Device& device) {
  TORCH_CHECK(generator_fits(generator, device), op, ": generator is on ", generator,
              " but params are on ", device);
}

// grad_output and input of a sum_sq_grad_* op: same floating dtype, same device.
inline void check_grad_input(const char* op, const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
              input.scalar_type());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output (",
              grad_output.scalar_type(), ") and input (", input.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output (", grad_output.device(),
              ") and input (", input.device(), ") must be on the same device");
}

// sum_sq_grad_linear: grad_output [N, T, out], input [N, T, in].
inline void check_linear(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(grad_output.dim() == 3, "sum_sq_grad_linear: grad_output must be [N, T, out], got ",
              grad_output.sizes());
  TORCH_CHECK(input.dim() == 3, "sum_sq_grad_linear: input must be [N, T, in], got ", input.sizes());
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(1) == input.size(1),
              "sum_sq_grad_linear: grad_output ", grad_output.sizes(), " and input ", input.sizes(),
              " must agree on N and T");
  check_grad_input("sum_sq_grad_linear", grad_output, input);
}

inline void check_conv_pair(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, "sum_sq_grad_conv2d: ", name, " must have 2 elements, got ", v);
  TORCH_CHECK(v[0] >= min && v[1] >= min, "sum_sq_grad_conv2d: ", name, " must be >= ", min,
              ", got ", v);
}

// sum_sq_grad_conv2d: grad_output [N, out, Ho, Wo], input [N, in, H, W], the convolution's
// arguments, and [Ho, Wo] matching them (the padded input at least the dilated kernel).
// Returns [Ho, Wo].
inline std::array<int64_t, 2> check_conv2d(const at::Tensor& grad_output, const at::Tensor& input,
                                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                           int64_t groups) {
  TORCH_CHECK(grad_output.dim() == 4, "sum_sq_grad_conv2d: grad_output must be [N, out, Ho, Wo], ",
              "got ", grad_output.sizes());
  TORCH_CHECK(input.dim() == 4, "sum_sq_grad_conv2d: input must be [N, in, H, W], got ",
              input.sizes());
  check_grad_input("sum_sq_grad_conv2d", grad_output, input);
  check_conv_pair(kernel_size, "kernel_size", 1);
  check_conv_pair(stride, "stride", 1);
  check_conv_pair(padding, "padding", 0);
  check_conv_pair(dilation, "dilation", 1);
  const int64_t N = input.size(0), C = input.size(1), out = grad_output.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0 && out % groups == 0, "sum_sq_grad_conv2d: groups (",
              groups, ") must divide in (", C, ") and out (", out, ")");
  TORCH_CHECK(grad_output.size(0) == N, "sum_sq_grad_conv2d: grad_output and input must have the ",
              "same N, got ", grad_output.size(0), " and ", N);
  std::array<int64_t, 2> size{};
  for (int k = 0; k < 2; ++k) {
    const int64_t span = dilation[k] * (kernel_size[k] - 1) + 1;
    const int64_t padded = input.size(2 + k) + 2 * padding[k];
    TORCH_CHECK(padded >= span, "sum_sq_grad_conv2d: padded input ", input.sizes(), " (padding ",
                padding, ") is smaller than the dilated kernel ", kernel_size, " (dilation ",
                dilation, ")");
    size[k] = (padded - span) / stride[k] + 1;
  }
  TORCH_CHECK(grad_output.size(2) == size[0] && grad_output.size(3) == size[1],
              "sum_sq_grad_conv2d: grad_output spatial size ", grad_output.sizes().slice(2),
              " does not match the output size [", size[0], ", ", size[1],
              "] of the convolution");
  return size;
}

}  // namespace mnemo_fast
