// The simulated device's self-test kernels (selftest.cpp), launched by name
// from the tests through sim_bindings.cpp.
#pragma once

#include <cstddef>
#include <string>

#include "cuda_runtime.h"

namespace eproj::sim {

// Launches the self-test kernel `name` as kernel<<<grid, block, shared_bytes,
// stream>>>(out, arg); returns cudaGetLastError() after it. Throws
// std::invalid_argument for an unknown name.
cudaError_t launch_selftest(const std::string& name, dim3 grid, dim3 block, std::size_t shared_bytes, float* out,
                            int arg, cudaStream_t stream);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) on a self-test kernel.
cudaError_t set_selftest_max_dynamic_shared(const std::string& name, int bytes);

}  // namespace eproj::sim
