// Reading idx files (the Fashion-MNIST format; gzip-compressed or not) into uint8 tensors, with the checks
// of resnet_deploy/data.py's read_idx.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace resnet_deploy {

// The uint8 tensor of an idx file of `ndim` dimensions (3 for images, 1 for labels); throws
// std::runtime_error saying what is wrong with the file.
at::Tensor read_idx(const std::string& path, int64_t ndim);

}  // namespace resnet_deploy
