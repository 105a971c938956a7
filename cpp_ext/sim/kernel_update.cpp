// cuda/update.cu compiled as C++ for the simulated device (cuda_runtime.h here).
#include "../cuda/update.cu"
