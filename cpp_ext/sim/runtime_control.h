// What the test harness (sim_bindings.cpp) controls on the simulated device
// beyond the CUDA runtime API.
#pragma once

#include <cstdint>

namespace eproj::sim {

// Forgets a sticky error (on a device the process would have to restart), so
// that the tests after one that provoked it run on a clean device.
void clear_sticky_error();

// Allocations of the simulated device not yet freed.
std::int64_t allocation_count();

}  // namespace eproj::sim
