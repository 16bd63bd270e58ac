#include "idx.h"

#include <zlib.h>

#include <cstring>
#include <stdexcept>
#include <vector>

namespace resnet_deploy {
namespace {

constexpr unsigned char kUnsignedByte = 0x08;  // the idx type code of unsigned bytes

// The whole file, decompressed when it is gzip (zlib reads plain files unchanged).
std::vector<unsigned char> read_file(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    throw std::runtime_error(path + " cannot be opened; expected an idx file (optionally .gz)");
  }
  std::vector<unsigned char> bytes;
  unsigned char chunk[1 << 16];
  int n;
  while ((n = gzread(file, chunk, sizeof(chunk))) > 0) {
    bytes.insert(bytes.end(), chunk, chunk + n);
  }
  int code = 0;
  const std::string error = n < 0 ? gzerror(file, &code) : "";
  gzclose(file);
  if (n < 0) {
    throw std::runtime_error(path + " cannot be read as an idx file (" + error + "); expected an intact file");
  }
  return bytes;
}

int64_t big_endian_u32(const unsigned char* p) {
  return (int64_t(p[0]) << 24) | (int64_t(p[1]) << 16) | (int64_t(p[2]) << 8) | int64_t(p[3]);
}

}  // namespace

at::Tensor read_idx(const std::string& path, int64_t ndim) {
  const std::vector<unsigned char> raw = read_file(path);
  const size_t header = 4 + 4 * ndim;
  if (raw.size() < header) {
    throw std::runtime_error(path + " is " + std::to_string(raw.size()) + " bytes, too short for an idx header of " +
                             std::to_string(header) + " bytes");
  }
  if (raw[0] != 0 || raw[1] != 0 || raw[2] != kUnsignedByte || raw[3] != ndim) {
    throw std::runtime_error(path + " is not an idx file of unsigned bytes with " + std::to_string(ndim) +
                             " dimension(s); its magic number says otherwise");
  }
  std::vector<int64_t> dims;
  int64_t count = 1;
  for (int64_t i = 0; i < ndim; ++i) {
    dims.push_back(big_endian_u32(&raw[4 + 4 * i]));
    count *= dims.back();
  }
  if (raw.size() != header + static_cast<size_t>(count)) {
    throw std::runtime_error(path + " is " + std::to_string(raw.size()) + " bytes but its header promises " +
                             std::to_string(header + count) + "; the file is truncated or corrupt");
  }
  at::Tensor tensor = at::empty(dims, at::kByte);
  std::memcpy(tensor.data_ptr<uint8_t>(), raw.data() + header, count);
  return tensor;
}

}  // namespace resnet_deploy
