#!/usr/bin/env bash
# Every test: the C++ suite (GoogleTest under CTest, incl. the find_package consumer) and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/cpp -G Ninja -DNPUFA_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release
cmake --build build/cpp -j 2
ctest --test-dir build/cpp --output-on-failure
python3 -m pytest -q tests/python "$@"
