// Internals of the simulated device shared by the runtime calls (runtime.cpp,
// memory.cpp) and the scheduler (scheduler.cpp): the limits of the simulated
// GPU, the grid runner, the error state.
#pragma once

#include <cstdint>
#include <string>

#include "cuda_runtime.h"

namespace eproj::sim {

// The simulated GPU: the limits of an H100 SXM (compute capability 9.0).
constexpr int kMultiprocessors = 132;
constexpr int kWarpSize = 32;
constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr unsigned int kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned int kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
constexpr std::size_t kDefaultDynamicShared = 48 * 1024;     // without the opt-in
constexpr std::size_t kMaxDynamicSharedOptin = 227 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr int kComputeMajor = 9;
constexpr int kComputeMinor = 0;

// Runs every block of the grid, one after another. False, with `error` saying
// what happened, when a thread broke the execution model (a partial or split
// barrier, a shuffle missing a lane, a deadlock, a write past the dynamic
// shared memory); the launch then failed.
bool run_grid(const LaunchConfig& config, void (*body)(void*), void* context, std::string* error);

// What the simulated device has run since the module was loaded.
struct Counters {
  std::int64_t launches = 0;   // grids run to the end or failed
  std::int64_t blocks = 0;
  std::int64_t threads = 0;
  std::int64_t switches = 0;   // fiber resumptions: a measure of the simulation's cost
};
Counters& counters();

// "dssim.cu:73" from a full __FILE__ path and a line.
std::string describe(Site site);

// Error state (runtime.cpp). fail records `error` as this thread's last error,
// with what went wrong for cudaGetErrorString, and returns it; sticky_error
// returns the sticky error (recording it as the last error too), or success;
// set_sticky makes `error` sticky.
cudaError_t fail(cudaError_t error, const std::string& what);
cudaError_t sticky_error();
void set_sticky(cudaError_t error, const std::string& what);
// Success for 0, cudaStreamLegacy, cudaStreamPerThread and a stream from
// cudaStreamCreate; otherwise fails with cudaErrorInvalidResourceHandle.
cudaError_t check_stream(cudaStream_t stream, const char* call);
std::string address(const void* pointer);  // "0x7f..."

// Memory (memory.cpp): a write past an allocation, found after a launch; empty when none.
std::string broken_redzone();

}  // namespace eproj::sim
