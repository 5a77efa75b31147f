// Minimal .npy reader/writer for little-endian float32 arrays in C order (the only kind ddpm_sample uses).
// Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

// An open .npy file positioned at the start of its data, read slab by slab (the noise file can be large).
class Float32Reader {
 public:
  explicit Float32Reader(const std::string& path) : path_(path) {
    f_ = std::fopen(path.c_str(), "rb");
    if (!f_) throw std::runtime_error("cannot open " + path);
    char magic[6];
    unsigned char ver[2];
    if (std::fread(magic, 1, 6, f_) != 6 || std::string(magic, 6) != "\x93NUMPY" || std::fread(ver, 1, 2, f_) != 2)
      fail("is not a .npy file");
    uint32_t header_len = 0;
    if (ver[0] == 1) {
      unsigned char b[2];
      if (std::fread(b, 1, 2, f_) != 2) fail("has a truncated header");
      header_len = b[0] | (b[1] << 8);
    } else if (ver[0] == 2 || ver[0] == 3) {
      unsigned char b[4];
      if (std::fread(b, 1, 4, f_) != 4) fail("has a truncated header");
      header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    } else {
      fail("has unsupported .npy version " + std::to_string(ver[0]));
    }
    std::string header(header_len, '\0');
    if (std::fread(&header[0], 1, header_len, f_) != header_len) fail("has a truncated header");
    parse_header(header);
    // The data must hold exactly prod(shape) floats.
    long start = std::ftell(f_);
    std::fseek(f_, 0, SEEK_END);
    long end = std::ftell(f_);
    std::fseek(f_, start, SEEK_SET);
    if (end - start != static_cast<long>(size() * sizeof(float)))
      fail("holds " + std::to_string(end - start) + " data bytes, its header promises " +
           std::to_string(size() * sizeof(float)));
  }
  ~Float32Reader() {
    if (f_) std::fclose(f_);
  }
  Float32Reader(const Float32Reader&) = delete;
  Float32Reader& operator=(const Float32Reader&) = delete;

  const std::vector<int64_t>& shape() const { return shape_; }
  size_t size() const {
    size_t n = 1;
    for (int64_t d : shape_) n *= static_cast<size_t>(d);
    return n;
  }
  // Reads the next `count` floats of the data.
  void read(float* dst, size_t count) {
    if (std::fread(dst, sizeof(float), count, f_) != count) fail("ended early");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error(path_ + " " + what); }

  static std::string value_of(const std::string& h, const std::string& key) {
    size_t k = h.find("'" + key + "'");
    if (k == std::string::npos) return "";
    size_t colon = h.find(':', k);
    if (colon == std::string::npos) return "";
    size_t b = h.find_first_not_of(" ", colon + 1);
    if (b == std::string::npos) return "";
    if (h[b] == '(') return h.substr(b, h.find(')', b) - b + 1);
    size_t e = h.find_first_of(",}", b);
    return h.substr(b, e - b);
  }

  void parse_header(const std::string& h) {
    std::string descr = value_of(h, "descr");
    if (descr != "'<f4'")
      fail("has dtype " + (descr.empty() ? std::string("?") : descr) + ", expected little-endian float32 ('<f4')");
    if (value_of(h, "fortran_order") != "False") fail("is in Fortran order, expected C order");
    std::string s = value_of(h, "shape");
    if (s.size() < 2 || s.front() != '(' || s.back() != ')') fail("has an unreadable shape");
    size_t i = 1;
    while (i < s.size() - 1) {
      while (i < s.size() - 1 && (s[i] == ' ' || s[i] == ',')) ++i;
      if (i >= s.size() - 1) break;
      size_t used = 0;
      long long d = std::stoll(s.substr(i), &used);
      if (used == 0 || d < 0) fail("has an unreadable shape");
      shape_.push_back(d);
      i += used;
    }
  }

  std::string path_;
  std::FILE* f_ = nullptr;
  std::vector<int64_t> shape_;
};

// Writes a float32 C-order array as .npy (format version 1.0) to an open file; false if a write failed.
// (The caller makes it atomic: see atomic_write in ddpm_sample.cpp.)
inline bool write_float32(std::FILE* f, const float* data, const std::vector<int64_t>& shape) {
  std::string dims;
  size_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += (i ? ", " : "") + std::to_string(shape[i]);
    n *= static_cast<size_t>(shape[i]);
  }
  if (shape.size() == 1) dims += ",";  // a 1-tuple is written "(n,)"
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;  // magic + version + length, header, '\n'
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  const unsigned char pre[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  return std::fwrite(pre, 1, 8, f) == 8 && std::fwrite(len, 1, 2, f) == 2 &&
         std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
         std::fwrite(data, sizeof(float), n, f) == n;
}

}  // namespace npy
