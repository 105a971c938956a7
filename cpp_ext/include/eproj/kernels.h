// Entry points of the kernels. Each device has one file per kernel under the
// same name (cpu/update.cpp, cuda/update.cu, ...). Callers (bindings.cpp) have
// validated shapes, dtypes, devices and contiguity; the kernels check their
// own invariants and, on CUDA, every launch.
#pragma once

#include <cstdint>
#include <string>

#include "eproj/math.h"

namespace eproj {

// One Hadamard-weighted (or masked, or plain) projection step for every active
// sample, in place on x (and m, v); writes distance = ||x_after - x0||_1,
// energy = loss + lambda ||x_before - x0||_1 and increments iterations of the
// active samples. Inactive samples are left untouched.
void update_cpu(const UpdateParams& params, const UpdateBuffers& buffers, int threads = 0);

// The stop check of every sample (see stop_sample in math.h).
void stop_check_cpu(const StopParams& params, const StopBuffers& buffers);

// DSSIM map (mean over channels), and optionally its mask and per-image max/mean.
void dssim_map_cpu(const DssimParams& params, const DssimBuffers& buffers, int threads = 0);

// Whether dssim_map_cpu runs its AVX2 variant on this machine.
bool cpu_uses_avx2();

// Number of OpenMP threads the CPU kernels use by default (1 without OpenMP).
// The `threads` argument of the CPU kernels overrides it when > 0: a caller
// whose own thread pool spins between kernel calls (ONNX Runtime, torch) asks
// for 1, so the two pools do not fight over the cores.
int cpu_threads();

#if defined(EPROJ_WITH_CUDA)
// Same semantics, on device pointers, launched on `stream` (a cudaStream_t).
void update_cuda(const UpdateParams& params, const UpdateBuffers& buffers, std::uintptr_t stream);
void dssim_map_cuda(const DssimParams& params, const DssimBuffers& buffers, std::uintptr_t stream);
void stop_check_cuda(const StopParams& params, const StopBuffers& buffers, std::uintptr_t stream);

// Empty when usable; otherwise why not (no driver, no device, ...).
std::string cuda_unavailable_reason();
// Kind of memory `pointer` lives in: "device", "managed", "host", "unregistered";
// sets `device` for device and managed memory.
std::string cuda_pointer_kind(std::uintptr_t pointer, int* device);
#endif

}  // namespace eproj
