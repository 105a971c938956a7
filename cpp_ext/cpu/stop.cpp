// The stop check on the CPU: a loop over the samples.
#include "eproj/kernels.h"

namespace eproj {

void stop_check_cpu(const StopParams& p, const StopBuffers& b) {
  for (std::int64_t i = 0; i < b.n; ++i) stop_sample(p, b, i);
}

}  // namespace eproj
