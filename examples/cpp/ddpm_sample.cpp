// ddpm_sample: draw DDPM samples from a ddpm-deploy step graph (model.step.onnx) through the ONNX Runtime C++ API.
//
//   ddpm_sample MODEL.step.onnx --n 16 --seed 0 --out samples.npy [--noise noise.npy] [--grid grid.pgm] [--threads N]
//               [--force]
//
// The step graph maps (x_t float32 [B,C,H,W], t int64 [B], noise float32 [B,C,H,W]) -> x_prev float32 [B,C,H,W]
// with the schedule baked in; this host only walks t = T-1 .. 0. Image shape and T come from the model's "ddpm.*"
// metadata. Noise: with --noise FILE, x_T and every step's noise are read from a float32 .npy of shape
// [T+1, N, C, H, W] (index 0 = x_T, index 1+j = noise of the j-th step, j = 0 being t = T-1), as written by
// `ddpm-run MODEL --save-noise FILE`, so the result matches the Python runtime. Without it, noise comes from
// std::mt19937_64(seed) + std::normal_distribution<float>, which is NOT the Python runtime's stream.
//
// Same safety rules as the Python CLIs: existing outputs are kept unless --force; outputs are written to a temp file
// `.<name>.ddpm-tmp-<pid>-<random>` beside them and linked into place (refused if the output appeared meanwhile),
// temps of dead processes are removed; NaN or inf in the noise file or in any step's output stops the run, and a
// run that cannot fit in memory is refused before allocating.

#define ORT_API_MANUAL_INIT  // check the library's API version ourselves instead of crashing at start-up
#include <onnxruntime_cxx_api.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.hpp"

namespace {

const char* const kFormat = "ddpm-deploy/model";
const char* const kFormatVersion = "1";
const std::vector<std::string> kInputs = {"x_t", "t", "noise"};
const char* const kOutput = "x_prev";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model, out, noise, grid;
  long long n = 16;
  bool n_given = false;
  unsigned long long seed = 0;
  int threads = 0;  // 0: ONNX Runtime's default
  bool force = false;
};

const char* const kUsage =
    "usage: ddpm_sample MODEL.step.onnx --out samples.npy [--n 16] [--seed 0] [--noise noise.npy] "
    "[--grid grid.pgm|.ppm] [--threads N] [--force]";

const char* const kHelp =
    "Runs the DDPM reverse chain t = T-1 .. 0 through a ddpm-deploy step graph; image shape and T come from\n"
    "the model's ddpm.* metadata.\n"
    "Only ancestral DDPM over all T steps; ddim, dpm++2m, sde-dpm++2m and unipc run in `ddpm-run` (Python).\n"
    "  --out FILE      samples as float32 .npy [N, C, H, W] (model space, normally [-1, 1])\n"
    "  --n N           number of images (default 16; with --noise taken from the file)\n"
    "  --seed S        seed of std::mt19937_64 when no --noise is given (NOT the Python runtime's stream)\n"
    "  --noise FILE    float32 .npy [T+1, N, C, H, W]: x_T, then the noise of each step (t = T-1 first), as\n"
    "                  written by `ddpm-run MODEL --save-noise FILE`; gives the Python runtime's samples\n"
    "  --grid FILE     also write a picture grid, .pgm for 1 channel or .ppm for 3\n"
    "  --threads N     ONNX Runtime intra-op threads (default 0: the library's choice)\n"
    "  --force         overwrite existing output files\n";

long long parse_int(const std::string& flag, const std::string& v, long long lo, long long hi) {
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size() || x < lo || x > hi)
    throw UsageError(flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "], got '" + v + "'");
  return x;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::printf("%s\n\n%s", kUsage, kHelp);
      std::exit(0);
    }
    if (a == "--force") {
      o.force = true;
      continue;
    }
    if (a.rfind("--", 0) == 0) {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      std::string v = argv[++i];
      if (a == "--n") {
        o.n = parse_int(a, v, 1, 1 << 20);
        o.n_given = true;
      } else if (a == "--seed") {
        o.seed = static_cast<unsigned long long>(parse_int(a, v, 0, INT64_MAX));
      } else if (a == "--threads") {
        o.threads = static_cast<int>(parse_int(a, v, 0, 1024));
      } else if (a == "--out") {
        o.out = v;
      } else if (a == "--noise") {
        o.noise = v;
      } else if (a == "--grid") {
        o.grid = v;
      } else {
        throw UsageError("unknown option " + a);
      }
    } else if (o.model.empty()) {
      o.model = a;
    } else {
      throw UsageError("unexpected argument '" + a + "'");
    }
  }
  if (o.model.empty()) throw UsageError("missing MODEL (a model.step.onnx written by ddpm-export)");
  if (o.out.empty()) throw UsageError("missing --out FILE.npy");
  if (o.out.size() < 4 || o.out.substr(o.out.size() - 4) != ".npy")
    throw UsageError("--out " + o.out + " would hold a .npy array; give it the .npy extension");
  if (!o.grid.empty()) {
    std::string ext = o.grid.size() >= 4 ? o.grid.substr(o.grid.size() - 4) : "";
    if (ext != ".pgm" && ext != ".ppm") throw UsageError("--grid must name a .pgm or .ppm file, got '" + o.grid + "'");
  }
  return o;
}

// ---- Output files, by the rules of runtime/fileio.py ----
const char* const kTempTag = ".ddpm-tmp-";

std::string folder_of(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string name_of(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Fails before the (long) sampling loop when an output could not be written, with the true reason.
void check_writable(const std::string& path, bool force) {
  struct stat st;
  if (stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) throw std::runtime_error(path + " is a directory; give a file path");
    if (!force) throw std::runtime_error(path + " already exists; pass --force to overwrite it or choose another path");
  }
  std::string folder = folder_of(path);
  if (stat(folder.c_str(), &st) != 0) {
    for (std::string up = folder; up != "." && up != "/";) {  // the nearest existing ancestor says why
      up = folder_of(up);
      if (stat(up.c_str(), &st) == 0) {
        if (!S_ISDIR(st.st_mode))
          throw std::runtime_error("cannot write " + path + ": " + up + " is a file, not a folder; choose another path");
        break;
      }
    }
    throw std::runtime_error("cannot write " + path + ": folder " + folder + " does not exist; create it first");
  }
  if (!S_ISDIR(st.st_mode))
    throw std::runtime_error("cannot write " + path + ": " + folder + " is a file, not a folder; choose another path");
  if (access(folder.c_str(), W_OK) != 0)
    throw std::runtime_error("cannot write " + path + ": folder " + folder + " is not writable; choose another path");
}

// Removes temp files in `folder` whose writing process is gone (a run killed with -9 leaves nothing that piles up).
void clear_stale_temps(const std::string& folder) {
  DIR* dir = opendir(folder.c_str());
  if (!dir) return;
  std::vector<std::string> stale;
  while (dirent* e = readdir(dir)) {
    std::string name = e->d_name;
    size_t tag = name.rfind(kTempTag);
    if (name.empty() || name[0] != '.' || tag == std::string::npos) continue;
    std::string rest = name.substr(tag + std::strlen(kTempTag));
    std::string pid_text = rest.substr(0, rest.find('-'));
    if (pid_text.empty() || pid_text.size() > 9 || pid_text.find_first_not_of("0123456789") != std::string::npos)
      continue;
    if (kill(static_cast<pid_t>(std::stol(pid_text)), 0) != 0 && errno == ESRCH) stale.push_back(name);
  }
  closedir(dir);
  for (const std::string& name : stale) unlink((folder + "/" + name).c_str());  // files only: we write no folders
}

// write(f) into a temp file beside `path`, fsync, then link it into place (replace=false: refuse if `path` exists by
// now) or rename over it (--force). The temp file never survives a failure.
void atomic_write(const std::string& path, bool replace, const std::function<bool(std::FILE*)>& write) {
  std::string folder = folder_of(path);
  clear_stale_temps(folder);
  std::string tmpl = folder + "/." + name_of(path) + kTempTag + std::to_string(getpid()) + "-XXXXXX";
  std::vector<char> tmp(tmpl.begin(), tmpl.end());
  tmp.push_back('\0');
  int fd = mkstemp(tmp.data());
  if (fd < 0) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
  std::FILE* f = fdopen(fd, "wb");
  bool ok = f && write(f) && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  mode_t mask = umask(0);
  umask(mask);
  ok = fchmod(fd, 0666 & ~mask) == 0 && ok;
  ok = (f ? std::fclose(f) == 0 : close(fd) == 0) && ok;
  std::string reason = ok ? "" : std::string(": ") + std::strerror(errno);
  if (ok && replace) {
    ok = std::rename(tmp.data(), path.c_str()) == 0;
  } else if (ok) {
    if (link(tmp.data(), path.c_str()) != 0) {
      int err = errno;
      if (err == EEXIST) {
        unlink(tmp.data());
        throw std::runtime_error(path + " appeared while this run was writing it (another run writing the same "
                                 "file?); it was kept: pass --force to overwrite or choose another path");
      }
      struct stat st;  // no hard links on this file system: check, then rename
      ok = stat(path.c_str(), &st) != 0 && std::rename(tmp.data(), path.c_str()) == 0;
    }
  }
  if (!ok && reason.empty()) reason = std::string(": ") + std::strerror(errno);
  unlink(tmp.data());  // after link(): the temp name; after rename(): already gone
  if (!ok) throw std::runtime_error("cannot write " + path + reason);
}

// Bytes of memory available now (Linux MemAvailable); -1 when unknown.
long long available_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  long long kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return -1;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

bool all_finite(const std::vector<float>& v) {
  double sum = 0.0;  // any NaN or inf makes the sum non-finite; finite floats cannot overflow a double sum
  for (float x : v) sum += x;
  return std::isfinite(sum);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) parts.push_back(item);
  return parts;
}

// What the sampler needs from the model's metadata, checked against the graph itself.
struct StepModel {
  int64_t C = 0, H = 0, W = 0, T = 0;
  double lo = -1.0, hi = 1.0;
};

StepModel inspect(const Ort::Session& session, const std::string& path) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::ModelMetadata md = session.GetModelMetadata();
  auto get = [&](const char* key) -> std::string {
    Ort::AllocatedStringPtr v = md.LookupCustomMetadataMapAllocated(key, alloc);
    return v ? std::string(v.get()) : std::string();
  };
  const std::string reexport = "; export the checkpoint with `ddpm-export CKPT` (it writes model.step.onnx)";
  if (get("ddpm.format") != kFormat) throw std::runtime_error(path + " has no ddpm-deploy metadata" + reexport);
  if (get("ddpm.format_version") != kFormatVersion)
    throw std::runtime_error(path + " has model format version '" + get("ddpm.format_version") +
                             "', this program reads " + kFormatVersion + reexport);
  std::string kind = get("ddpm.kind");
  if (kind != "step")
    throw std::runtime_error(path + " is a graph of kind '" + kind + "', ddpm_sample needs the sampler-step graph (kind "
                             "'step', model.step.onnx)");

  StepModel m;
  std::vector<std::string> shape = split(get("ddpm.image_shape"), ',');
  std::string T = get("ddpm.num_timesteps");
  try {
    if (shape.size() != 3) throw std::invalid_argument("shape");
    m.C = std::stoll(shape[0]);
    m.H = std::stoll(shape[1]);
    m.W = std::stoll(shape[2]);
    m.T = std::stoll(T);
    std::vector<std::string> range = split(get("ddpm.data_range"), ',');
    if (range.size() == 2) {
      m.lo = std::stod(range[0]);
      m.hi = std::stod(range[1]);
    }
  } catch (const std::exception&) {
    m.C = 0;
  }
  if (m.C <= 0 || m.H <= 0 || m.W <= 0 || m.T <= 0 || !(m.hi > m.lo))
    throw std::runtime_error(path + " has unreadable metadata (ddpm.image_shape='" + get("ddpm.image_shape") +
                             "', ddpm.num_timesteps='" + T + "'); re-export it");

  // The declared interface and the graph's real one must both be (x_t, t, noise) -> x_prev.
  const std::string want_in = "x_t,t,noise";
  if (get("ddpm.inputs") != want_in || get("ddpm.outputs") != kOutput)
    throw std::runtime_error(path + " declares inputs '" + get("ddpm.inputs") + "' and outputs '" +
                             get("ddpm.outputs") + "', expected '" + want_in + "' -> '" + kOutput + "'");
  std::map<std::string, ONNXTensorElementDataType> ins;
  std::map<std::string, std::vector<int64_t>> dims;  // -1: a free (named) dimension
  std::string got_in;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    std::string name = session.GetInputNameAllocated(i, alloc).get();
    got_in += (i ? "," : "") + name;
    Ort::TypeInfo type = session.GetInputTypeInfo(i);  // owns what `info` views
    auto info = type.GetTensorTypeAndShapeInfo();
    ins[name] = info.GetElementType();
    dims[name] = info.GetShape();
  }
  bool outputs_ok = false;
  std::string got_out;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    std::string name = session.GetOutputNameAllocated(i, alloc).get();
    got_out += (i ? "," : "") + name;
    outputs_ok = outputs_ok || name == kOutput;
    dims[name] = session.GetOutputTypeInfo(i).GetTensorTypeAndShapeInfo().GetShape();
  }
  bool inputs_ok = ins.size() == 3 && ins.count("x_t") && ins.count("t") && ins.count("noise");
  if (!inputs_ok || !outputs_ok)
    throw std::runtime_error(path + " has graph inputs '" + got_in + "' and outputs '" + got_out + "', expected '" +
                             want_in + "' -> '" + kOutput + "'");
  if (ins["x_t"] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || ins["noise"] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
      ins["t"] != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
    throw std::runtime_error(path + " has the wrong input types, expected x_t float32, t int64, noise float32");
  // Each image tensor must be [batch, C, H, W] with the metadata's C, H, W (or free dimensions there).
  const int64_t want[3] = {m.C, m.H, m.W};
  std::string bad;
  for (const char* name : {"x_t", "noise", kOutput}) {
    const std::vector<int64_t>& d = dims[name];
    bool fits = d.size() == 4;
    for (int j = 0; fits && j < 3; ++j) fits = d[j + 1] < 0 || d[j + 1] == want[j];
    if (fits) continue;
    std::string shown;
    for (size_t j = 0; j < d.size(); ++j) shown += (j ? "," : "") + (d[j] < 0 ? std::string("?") : std::to_string(d[j]));
    bad += (bad.empty() ? "" : ", ") + std::string(name) + " [" + shown + "]";
  }
  if (!bad.empty())
    throw std::runtime_error(path + " has graph tensors " + bad + " that do not fit its metadata image shape " +
                             get("ddpm.image_shape") + " (expected [batch," + get("ddpm.image_shape") +
                             "]); re-export it");
  return m;
}

// Source of x_T and the per-step noise: a noise file, or a seeded std::mt19937_64.
class Noise {
 public:
  Noise(const Options& o, const StepModel& m) : seed_rng_(o.seed) {
    if (o.noise.empty()) return;
    if (!std::ifstream(o.noise)) throw std::runtime_error("noise file not found or unreadable: " + o.noise);
    file_ = std::make_unique<npy::Float32Reader>(o.noise);
    path_ = "noise file " + o.noise;
    const std::vector<int64_t>& s = file_->shape();
    bool ok = s.size() == 5 && s[0] == m.T + 1 && s[2] == m.C && s[3] == m.H && s[4] == m.W && s[1] > 0;
    if (!ok) {
      std::string got;
      for (size_t i = 0; i < s.size(); ++i) got += (i ? "," : "") + std::to_string(s[i]);
      throw std::runtime_error(o.noise + " has shape [" + got + "], the model needs [T+1, N, C, H, W] = [" +
                               std::to_string(m.T + 1) + ", N, " + std::to_string(m.C) + ", " +
                               std::to_string(m.H) + ", " + std::to_string(m.W) + "]");
    }
    if (o.n_given && s[1] != o.n)
      throw std::runtime_error(o.noise + " holds noise for " + std::to_string(s[1]) + " images, --n asks for " +
                               std::to_string(o.n));
  }
  // Number of images the noise file fixes (0 without a file).
  int64_t batch() const { return file_ ? file_->shape()[1] : 0; }
  // Fills the next slab: first x_T, then the noise of each step in sampling order.
  void next(std::vector<float>& dst) {
    if (file_) {
      file_->read(dst.data(), dst.size());
      if (!all_finite(dst))
        throw std::runtime_error(path_ + " holds NaN or inf in entry " + std::to_string(entry_) + " (" +
                                 (entry_ ? "the noise of step " + std::to_string(entry_) : std::string("x_T")) +
                                 "); nothing was written");
      ++entry_;
    } else {
      for (float& v : dst) v = gauss_(seed_rng_);
    }
  }

 private:
  std::unique_ptr<npy::Float32Reader> file_;
  std::string path_;
  int64_t entry_ = 0;
  std::mt19937_64 seed_rng_;
  std::normal_distribution<float> gauss_{0.0f, 1.0f};
};

// N x C x H x W samples -> one picture, ceil(sqrt(N)) columns, 2 black pixels between images, binary PGM/PPM.
void write_grid(const std::string& path, const std::vector<float>& x, int64_t N, const StepModel& m, bool force) {
  if (m.C != 1 && m.C != 3)
    throw std::runtime_error("--grid needs 1 or 3 channels, the model has " + std::to_string(m.C));
  const int64_t pad = 2;
  int64_t cols = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(N)))));
  int64_t rows = (N + cols - 1) / cols;
  int64_t gw = pad + cols * (m.W + pad), gh = pad + rows * (m.H + pad);
  std::vector<unsigned char> pic(static_cast<size_t>(gw * gh * m.C), 0);
  for (int64_t i = 0; i < N; ++i) {
    int64_t y0 = pad + (i / cols) * (m.H + pad), x0 = pad + (i % cols) * (m.W + pad);
    for (int64_t c = 0; c < m.C; ++c)
      for (int64_t y = 0; y < m.H; ++y)
        for (int64_t xx = 0; xx < m.W; ++xx) {
          double v = x[static_cast<size_t>(((i * m.C + c) * m.H + y) * m.W + xx)];
          double s = std::nearbyint((v - m.lo) * (255.0 / (m.hi - m.lo)));  // rounds half to even, like np.rint
          pic[static_cast<size_t>(((y0 + y) * gw + x0 + xx) * m.C + c)] =
              static_cast<unsigned char>(std::min(255.0, std::max(0.0, s)));
        }
  }
  std::string head = std::string(m.C == 1 ? "P5" : "P6") + "\n" + std::to_string(gw) + " " + std::to_string(gh) +
                     "\n255\n";
  atomic_write(path, force, [&](std::FILE* f) {
    return std::fwrite(head.data(), 1, head.size(), f) == head.size() &&
           std::fwrite(pic.data(), 1, pic.size(), f) == pic.size();
  });
}

int run(const Options& o) {
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api)
    throw std::runtime_error(std::string("the ONNX Runtime library (version ") + OrtGetApiBase()->GetVersionString() +
                             ") does not offer C API version " + std::to_string(ORT_API_VERSION) +
                             " that this program was built with; use a library at least as new as the headers");
  Ort::InitApi(api);

  {
    std::ifstream probe(o.model, std::ios::binary);
    if (!probe) throw std::runtime_error("model file not found or unreadable: " + o.model);
  }
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "ddpm_sample");
  Ort::SessionOptions so;
  if (o.threads > 0) so.SetIntraOpNumThreads(o.threads);
  so.SetInterOpNumThreads(1);
  so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  std::unique_ptr<Ort::Session> session;
  try {
    session = std::make_unique<Ort::Session>(env, o.model.c_str(), so);
  } catch (const Ort::Exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    throw std::runtime_error("cannot load " + o.model + " as an ONNX model: " + msg);
  }
  StepModel m = inspect(*session, o.model);

  check_writable(o.out, o.force);
  if (!o.grid.empty()) check_writable(o.grid, o.force);
  if (!o.grid.empty() && o.grid == o.out) throw std::runtime_error("--out and --grid must be different files");
  if (!o.grid.empty() && m.C != 1 && m.C != 3)
    throw std::runtime_error("--grid needs 1 or 3 channels, the model has " + std::to_string(m.C));
  Noise noise(o, m);
  const int64_t N = noise.batch() ? noise.batch() : o.n;
  const int64_t shape[4] = {N, m.C, m.H, m.W};
  const size_t count = static_cast<size_t>(N * m.C * m.H * m.W);
  const double need = 4.0 * count * sizeof(float);  // x_t, x_prev, noise and the grid's picture, at the least
  const long long have = available_memory();
  if (have >= 0 && need > static_cast<double>(have))
    throw std::runtime_error(std::to_string(N) + " images need at least " + gib(need) + " of memory, " + gib(have) +
                             " is available; lower --n");
  std::vector<float> a(count), b(count), z(count);
  std::vector<int64_t> t(static_cast<size_t>(N));
  noise.next(a);  // x_T

  // Tensors over our own buffers, no copies: x_t alternates between `a` and `b` (x_prev goes to the other one).
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  auto tensor = [&](std::vector<float>& buf) { return Ort::Value::CreateTensor<float>(cpu, buf.data(), count, shape, 4); };
  auto tensor_t = [&]() { return Ort::Value::CreateTensor<int64_t>(cpu, t.data(), t.size(), shape, 1); };
  Ort::Value in_ab[3] = {tensor(a), tensor_t(), tensor(z)};
  Ort::Value in_ba[3] = {tensor(b), tensor_t(), tensor(z)};
  Ort::Value out_ab[1] = {tensor(b)};
  Ort::Value out_ba[1] = {tensor(a)};
  const char* in_names[3] = {"x_t", "t", "noise"};
  const char* out_names[1] = {kOutput};
  Ort::RunOptions ro;

  auto start = std::chrono::steady_clock::now();
  bool in_a = true;
  for (int64_t step = m.T - 1; step >= 0; --step) {  // the same t for the whole batch
    std::fill(t.begin(), t.end(), step);
    noise.next(z);
    session->Run(ro, in_names, in_a ? in_ab : in_ba, 3, out_names, in_a ? out_ab : out_ba, 1);
    in_a = !in_a;
    if (!all_finite(in_a ? a : b))
      throw std::runtime_error("sampling produced NaN or inf at step " + std::to_string(m.T - step) + " of " +
                               std::to_string(m.T) + " (t=" + std::to_string(step) + "): the model (NaN weights?) "
                               "or its noise is broken; nothing was written");
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::vector<float>& x = in_a ? a : b;

  atomic_write(o.out, o.force, [&](std::FILE* f) { return npy::write_float32(f, x.data(), {N, m.C, m.H, m.W}); });
  if (!o.grid.empty()) write_grid(o.grid, x, N, m, o.force);
  std::fprintf(stderr, "ddpm_sample: %lld images %lldx%lldx%lld, %lld steps in %.2f s (%.2f ms/step), noise: %s -> %s\n",
               static_cast<long long>(N), static_cast<long long>(m.C), static_cast<long long>(m.H),
               static_cast<long long>(m.W), static_cast<long long>(m.T), secs, 1000.0 * secs / m.T,
               o.noise.empty() ? "std::mt19937_64" : o.noise.c_str(), o.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "ddpm_sample: error: %s (see --help)\n", e.what());
    return 2;
  } catch (const Ort::Exception& e) {
    std::string msg = e.what();
    std::fprintf(stderr, "ddpm_sample: error: ONNX Runtime: %s\n", msg.substr(0, msg.find('\n')).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ddpm_sample: error: %s\n", e.what());
    return 1;
  }
}
