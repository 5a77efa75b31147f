#!/usr/bin/env bash
# Builds examples/cpp/build/ddpm_sample against ONNX Runtime.
#
#   examples/cpp/build.sh                          # headers: Debian trixie's libonnxruntime-dev (.deb, unpacked,
#                                                  #   not installed) into examples/cpp/third_party/;
#                                                  # library: libonnxruntime.so.1.* of the installed onnxruntime wheel
#   ONNXRUNTIME_ROOT=/opt/onnxruntime examples/cpp/build.sh   # your own ONNX Runtime (include/ and lib/)
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), ONNXRUNTIME_ROOT, DEBIAN_MIRROR
# (default http://deb.debian.org/debian), ORT_HEADERS_SUITE (default trixie). Safe to run again: the header
# download is skipped once the headers are present. Exit status: 0 built, 3 a build input cannot be had on this
# machine (compiler/CMake, header package, onnxruntime wheel), 1 anything else.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="$HERE/build"
THIRD="$HERE/third_party"
HEADERS_PKG="libonnxruntime-dev"
HEADERS_ROOT="$THIRD/$HEADERS_PKG"
HEADERS_DIR="$HEADERS_ROOT/usr/include/onnxruntime"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${ORT_HEADERS_SUITE:-trixie}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

die() { echo "build.sh: error: $*" >&2; exit 1; }
# Exit status 3: this machine cannot provide a build input (tools, headers, library); other failures exit 1.
unavailable() { echo "build.sh: error: $*" >&2; exit 3; }
note() { echo "build.sh: $*" >&2; }

for tool in cmake c++; do
  command -v "$tool" >/dev/null || unavailable "'$tool' not found; install a C++17 compiler and CMake (Debian: apt-get install -y g++ cmake)"
done

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY="$REPO/.venv/bin/python"
else
  PY=python3
fi

fetch_headers() {
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
    unavailable "apt-get/dpkg-deb not found: cannot fetch $HEADERS_PKG; pass ONNXRUNTIME_ROOT=<ONNX Runtime with include/ and lib/>"
  [[ -r "$KEYRING" ]] || unavailable "$KEYRING not found (package debian-archive-keyring): cannot verify $SUITE's archive"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/parts" "$tmp/prefs" "$tmp/dl"
  echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$tmp/sources.list"
  : >"$tmp/status"
  # A private apt configuration: only this source, its own lists/cache/status, nothing of the system's touched.
  local apt=(apt-get -q
    -o "Dir::Etc::sourcelist=$tmp/sources.list" -o "Dir::Etc::sourceparts=$tmp/parts"
    -o "Dir::Etc::preferences=$tmp/prefs/none" -o "Dir::Etc::preferencesparts=$tmp/prefs"
    -o "Dir::State=$tmp" -o "Dir::State::Lists=$tmp/lists" -o "Dir::State::status=$tmp/status"
    -o "Dir::Cache=$tmp/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)"
    -o "APT::Architecture=$(dpkg --print-architecture)" -o "APT::Architectures=$(dpkg --print-architecture)")
  note "fetching $HEADERS_PKG from $MIRROR $SUITE (headers only, not installed)"
  "${apt[@]}" --error-on=any update >"$tmp/update.log" 2>&1 ||
    { cat "$tmp/update.log" >&2; unavailable "apt-get update for $SUITE failed; cannot obtain the ONNX Runtime headers"; }
  (cd "$tmp/dl" && "${apt[@]}" download "$HEADERS_PKG") >"$tmp/download.log" 2>&1 ||
    { cat "$tmp/download.log" >&2; unavailable "apt-get download $HEADERS_PKG failed; cannot obtain the ONNX Runtime headers"; }
  local deb
  deb="$(ls "$tmp/dl"/"$HEADERS_PKG"_*.deb 2>/dev/null | head -n 1)"
  [[ -n "$deb" ]] || die "apt-get download left no $HEADERS_PKG .deb"
  rm -rf "$HEADERS_ROOT.partial"
  mkdir -p "$HEADERS_ROOT.partial"
  dpkg-deb -x "$deb" "$HEADERS_ROOT.partial"
  [[ -f "$HEADERS_ROOT.partial/usr/include/onnxruntime/onnxruntime_cxx_api.h" ]] ||
    die "$(basename "$deb") holds no usr/include/onnxruntime/onnxruntime_cxx_api.h"
  basename "$deb" >"$HEADERS_ROOT.partial/SOURCE"
  rm -rf "$HEADERS_ROOT"
  mv "$HEADERS_ROOT.partial" "$HEADERS_ROOT"
  note "headers from $(basename "$deb") in $HEADERS_DIR"
}

mkdir -p "$BUILD"
if [[ -n "${ONNXRUNTIME_ROOT:-}" ]]; then
  [[ -d "$ONNXRUNTIME_ROOT" ]] || die "ONNXRUNTIME_ROOT=$ONNXRUNTIME_ROOT is not a folder"
  CMAKE_ORT=(-DONNXRUNTIME_ROOT="$ONNXRUNTIME_ROOT" -DONNXRUNTIME_INCLUDE_DIR= -DONNXRUNTIME_LIB_DIR=)
  note "using ONNX Runtime from $ONNXRUNTIME_ROOT"
else
  if [[ -f "$HEADERS_DIR/onnxruntime_cxx_api.h" ]]; then
    note "headers present in $HEADERS_DIR ($(cat "$HEADERS_ROOT/SOURCE" 2>/dev/null || echo unknown source))"
  else
    mkdir -p "$THIRD"
    fetch_headers
  fi
  header_api="$(sed -n 's/^#define ORT_API_VERSION \([0-9][0-9]*\).*/\1/p' "$HEADERS_DIR/onnxruntime_c_api.h")"
  [[ -n "$header_api" ]] || die "no ORT_API_VERSION in $HEADERS_DIR/onnxruntime_c_api.h"

  ort_pkg="$("$PY" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))' 2>/dev/null)" ||
    unavailable "$PY cannot import onnxruntime (set PYTHON=<python with the onnxruntime wheel> or ONNXRUNTIME_ROOT)"
  ort_lib="$(ls "$ort_pkg"/capi/libonnxruntime.so.1.* 2>/dev/null | sort -V | tail -n 1)"
  [[ -n "$ort_lib" ]] || unavailable "no capi/libonnxruntime.so.1.* in $ort_pkg"
  lib_version="${ort_lib##*/libonnxruntime.so.}"  # e.g. 1.32.0; ONNX Runtime 1.X serves C API versions <= X
  lib_api="$(echo "$lib_version" | cut -d. -f2)"
  if (( lib_api < header_api )); then
    die "the onnxruntime wheel's library $lib_version (C API $lib_api) is older than the headers (C API $header_api); upgrade onnxruntime"
  fi
  note "headers C API $header_api, library $lib_version (C API $lib_api) from $ort_lib"

  LIBDIR="$BUILD/ort-lib"
  mkdir -p "$LIBDIR"
  ln -sfn "$ort_lib" "$LIBDIR/libonnxruntime.so.1"
  ln -sfn libonnxruntime.so.1 "$LIBDIR/libonnxruntime.so"
  CMAKE_ORT=(-DONNXRUNTIME_ROOT= -DONNXRUNTIME_INCLUDE_DIR="$HEADERS_DIR" -DONNXRUNTIME_LIB_DIR="$LIBDIR")
fi

cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${CMAKE_ORT[@]}" >"$BUILD/configure.log" 2>&1 ||
  { cat "$BUILD/configure.log" >&2; die "CMake configuration failed"; }
cmake --build "$BUILD" -j "${BUILD_JOBS:-2}" >"$BUILD/build.log" 2>&1 ||
  { cat "$BUILD/build.log" >&2; die "compilation failed"; }
note "built $BUILD/ddpm_sample"
