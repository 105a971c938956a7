// The DSSIM kernel of dssim.cpp compiled for AVX2 (CMake adds -mavx2 to this
// file only); dssim_map_cpu calls it when the CPU supports AVX2.
#define EPROJ_CPU_VARIANT_AVX2 1
#include "dssim.cpp"
