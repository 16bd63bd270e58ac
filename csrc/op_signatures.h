// The operators' C++ signatures (schemas in ops.cpp), for typed calls through the dispatcher.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace resnet_deploy {

using OptionalTensor = std::optional<at::Tensor>;

using TrainSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptionalTensor&,
                                                                const OptionalTensor&, const OptionalTensor&, double);
using EvalSig = at::Tensor(const at::Tensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
                           const OptionalTensor&, const OptionalTensor&, double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptionalTensor&, const OptionalTensor&, bool, bool);
using UpdateRunningStatsSig = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                   int64_t);

// A handle to resnet_deploy::<name>; keep it in a function-local static, the lookup takes a lock.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline bool present(const OptionalTensor& tensor) { return tensor.has_value() && tensor->defined(); }

}  // namespace resnet_deploy
