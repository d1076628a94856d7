#!/usr/bin/env bash
# FaceMoE's TensorRT layer against NVIDIA's real Python bindings and the real cuda-python releases, without
# a GPU (docs/TENSORRT.md, "CI against the real bindings"). PyPI serves the real tensorrt-cu12/cu13-bindings
# wheels but only placeholder -libs packages, so `import tensorrt` needs libnvinfer & co: tiny stand-ins
# for the C entry points the bindings link are compiled here with the system C compiler. NVIDIA's wheels
# are installed into throw-away target directories at CI time, never into the project.
#
# Needs: the project's virtual environment active (python with facemoe, numpy), `cc`, access to PyPI.
# Override the versions with TRT_MATRIX / CUDA_MATRIX (space-separated) if needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python || command -v python3)}"
# flavour:version:how the `tensorrt` package is made. It comes from NVIDIA's meta package, a plain sdist on
# PyPI from 10.13 on ("sdist"); before that the sdist only redirects to NVIDIA's own index (slow, and not
# the code under test), so the one-line alias package it would install is written instead ("alias").
TRT_MATRIX="${TRT_MATRIX-cu12:10.3.0:alias cu12:10.6.0:alias cu12:10.13.3.9:sdist cu12:11.4.0.106:sdist cu13:11.4.0.106:sdist}"
CUDA_MATRIX="${CUDA_MATRIX-12.6.2.post1 12.9.4 13.4.4}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/facemoe-trt-bindings.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
started=$SECONDS
failed=0
pip_target() { "$PY" -m pip install -q --disable-pip-version-check --target "$@"; }

for major in 10 11; do
  mkdir -p "$WORK/lib$major"
  for lib in nvinfer nvonnxparser nvinfer_plugin; do
    cc -shared -fPIC -O1 -Wall -Werror -o "$WORK/lib$major/lib$lib.so.$major" "tests/trt_bindings/standin_$lib.c"
  done
done

for entry in $TRT_MATRIX; do
  IFS=: read -r flavour version how <<<"$entry"
  major="${version%%.*}" dir="$WORK/trt-$flavour-$version"
  echo "== tensorrt-$flavour-bindings $version ($how)"
  if [ "$how" = sdist ]; then
    pip_target "$dir" --no-deps "tensorrt-$flavour-bindings==$version" "tensorrt-$flavour==$version" >"$WORK/pip.log" 2>&1 \
      || { cat "$WORK/pip.log"; failed=1; continue; }
  else
    pip_target "$dir" --no-deps "tensorrt-$flavour-bindings==$version" >"$WORK/pip.log" 2>&1 \
      || { cat "$WORK/pip.log"; failed=1; continue; }
    mkdir -p "$dir/tensorrt"
    printf 'from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__\n' >"$dir/tensorrt/__init__.py"
  fi
  LD_LIBRARY_PATH="$WORK/lib$major" PYTHONPATH="$dir:tests:src" \
    "$PY" tests/trt_bindings/check_tensorrt.py "$version" 2> >(grep -v '^\[.*\] \[TRT\] \[W\]' >&2) || failed=1
done

for version in $CUDA_MATRIX; do
  dir="$WORK/cuda-$version"
  echo "== cuda-python $version"
  pip_target "$dir" "cuda-python==$version" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; failed=1; continue; }
  PYTHONPATH="$dir:tests:src" "$PY" tests/trt_bindings/check_cuda.py "$version" "$dir" || failed=1
done

echo "real-bindings checks took $((SECONDS - started)) s"
exit "$failed"
