// The Python functions of the simulated device, added to the module
// eproj.cpp_ext._kernels_sim beside the kernels' own (bindings.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace eproj::sim {

void add_sim_bindings(nanobind::module_& m);

}  // namespace eproj::sim
