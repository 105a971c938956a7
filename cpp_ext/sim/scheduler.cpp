// The simulated device's execution model: every CUDA thread of a block is a
// fiber; blocks run one after another.
//
// A block runs in rounds, from barrier to barrier. A round runs the warps one
// after another, each as far as it goes: its ready lanes run one at a time
// until they wait (at a barrier or a shuffle) or exit, again and again, until
// every lane of the warp waits at a barrier or exited. The order (of the
// warps, and of the lanes in a warp) is forward or reverse and flips from
// round to round; even blocks start forward, odd ones in reverse. So one warp
// runs far ahead of the others, as a real GPU may let it, and a missing
// barrier between a write to shared memory and another thread's read of it
// shows up: in one of the two orders the reader runs first and reads the NaN
// bytes the block started with, or a value of a previous phase.
//
//   - __syncthreads() releases when every thread of the block waits at the
//     same call site. A barrier reached while other threads had exited or wait
//     at another call site fails the launch: CUDA leaves that undefined.
//   - A warp shuffle (and __syncwarp) completes when every lane of its mask
//     waits at the same call site with the same mask; the last lane to arrive
//     hands every lane its value. A lane of the mask that exited, does not
//     exist or never comes, and a source lane outside the mask, fail the
//     launch. (Requiring the same call site is stricter than sm_70 and newer
//     need: it is what every architecture's convergence rules allow.)
//   - When no thread is ready and neither rule releases any, the block is
//     deadlocked: the launch fails and says where each thread waits.
//
// Fibers: each stack is made once with makecontext and entered with
// setcontext; afterwards a thread waits and resumes with _setjmp/_longjmp,
// which, unlike swapcontext, does not save and restore the signal mask with a
// system call (about 25 ns instead of 560 ns per switch here; a 512 x 512
// DSSIM map takes a few million switches). A fiber's entry loops, so the same
// stacks run every block of every launch; a failed launch abandons its fibers
// and restarts them through makecontext.
#undef _FORTIFY_SOURCE  // __longjmp_chk refuses jumps between stacks
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "device.h"

namespace eproj::sim {

ThreadCoordinates current{};

namespace {

constexpr std::size_t kStackBytes = 256 * 1024;   // reserved, committed as used
constexpr std::size_t kGuardBytes = 64 * 1024;    // PROT_NONE below each stack: an overflow faults
constexpr std::size_t kSharedRedzone = 16 * 1024; // NaN bytes after the dynamic shared memory, checked after each block
constexpr unsigned char kNanByte = 0xff;          // 0xffffffff is a float NaN, 0xff..ff a double NaN

enum class State { kReady, kBarrier, kShuffle, kExited };

struct Fiber {
  char* mapping = nullptr;  // guard + stack
  ucontext_t start{};       // the entry, made with makecontext
  jmp_buf resume{};         // where the thread continues after it waited
  bool entered = false;     // inside fiber_main (false: start it through `start`)
  // the thread it runs in the current block
  uint3 index{};
  int linear = 0;
  State state = State::kExited;
  Site site{};
  // the shuffle it waits at
  ShuffleKind kind = ShuffleKind::kSync;
  unsigned int mask = 0;
  int lane_arg = 0, width = 32;
  std::uint64_t value = 0, result = 0;

  ~Fiber() {
    if (mapping) munmap(mapping, kGuardBytes + kStackBytes);
  }
};

// The state of the launch being run (launches run one at a time: runtime.cpp
// holds a lock around run_grid).
struct Device {
  std::vector<std::unique_ptr<Fiber>> fibers;  // grows to the largest block seen
  int threads = 0;                             // of the current block
  Fiber* running = nullptr;                    // the fiber being run, null outside a block
  jmp_buf scheduler{};
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  bool failed = false;
  std::string error;
  std::vector<unsigned char> shared;           // dynamic shared memory + redzone
  std::size_t shared_offset = 0;               // of the 128-byte aligned start in `shared`
  std::size_t shared_bytes = 0;
};

Device& device() {
  static Device d;
  return d;
}

std::string coordinates(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

std::string hex_mask(unsigned int mask) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", mask);
  return text;
}

const char* shuffle_name(ShuffleKind kind) {
  switch (kind) {
    case ShuffleKind::kIndex: return "__shfl_sync";
    case ShuffleKind::kUp: return "__shfl_up_sync";
    case ShuffleKind::kDown: return "__shfl_down_sync";
    case ShuffleKind::kXor: return "__shfl_xor_sync";
    default: return "__syncwarp";
  }
}

// Where a thread is, for error messages.
std::string whereabouts(const Fiber& f) {
  switch (f.state) {
    case State::kExited: return "it exited";
    case State::kBarrier: return "it waits at __syncthreads() at " + describe(f.site);
    case State::kShuffle:
      return std::string("it waits at ") + shuffle_name(f.kind) + " at " + describe(f.site) + " with mask " +
             hex_mask(f.mask);
    default: return "it is ready to run";
  }
}

[[noreturn]] void fiber_main_loop();

extern "C" void fiber_main() { fiber_main_loop(); }

void fiber_main_loop() {
  Device& d = device();
  for (;;) {
    d.body(d.context);
    Fiber& self = *d.running;
    self.state = State::kExited;
    if (_setjmp(self.resume) == 0) _longjmp(d.scheduler, 1);
  }
}

// Resumes `f` until it waits or exits.
void resume(Fiber& f) {
  Device& d = device();
  current.thread_idx = f.index;
  d.running = &f;
  ++counters().switches;
  if (_setjmp(d.scheduler) == 0) {
    if (f.entered) _longjmp(f.resume, 1);
    f.entered = true;
    f.start.uc_stack.ss_sp = f.mapping + kGuardBytes;
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;
    makecontext(&f.start, fiber_main, 0);
    setcontext(&f.start);
  }
  d.running = nullptr;
}

// The running thread waits; returns when the scheduler resumes it.
void wait_here(Fiber& f) {
  if (_setjmp(f.resume) == 0) _longjmp(device().scheduler, 1);
}

// Fails the launch from inside a thread: the block's fibers are abandoned.
[[noreturn]] void fail_in_thread(const std::string& message) {
  Device& d = device();
  d.failed = true;
  d.error = message;
  d.running->entered = false;
  _longjmp(d.scheduler, 1);
}

Fiber& running_thread(const char* what) {
  Fiber* f = device().running;
  if (f == nullptr)
    throw std::logic_error(std::string("simulated device: ") + what + " called outside a kernel");
  return *f;
}

void make_fibers(int count) {
  Device& d = device();
  while (static_cast<int>(d.fibers.size()) < count) {
    auto f = std::make_unique<Fiber>();
    void* mapping = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) throw std::runtime_error("simulated device: could not map a fiber stack");
    f->mapping = static_cast<char*>(mapping);
    mprotect(f->mapping, kGuardBytes, PROT_NONE);
    if (getcontext(&f->start) != 0) throw std::runtime_error("simulated device: getcontext failed");
    d.fibers.push_back(std::move(f));
  }
}

bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

bool same_shuffle(const Fiber& a, const Fiber& b) {
  return a.state == State::kShuffle && b.state == State::kShuffle && same_site(a.site, b.site) && a.kind == b.kind &&
         a.mask == b.mask && a.width == b.width;
}

// The lane whose value `lane` receives; -1: its own.
int source_lane(const Fiber& f, int lane) {
  const int base = lane / f.width * f.width;
  switch (f.kind) {
    case ShuffleKind::kIndex: return base + (f.lane_arg % f.width + f.width) % f.width;
    case ShuffleKind::kUp: return lane - f.lane_arg >= base ? lane - f.lane_arg : -1;
    case ShuffleKind::kDown: return lane + f.lane_arg < base + f.width ? lane + f.lane_arg : -1;
    case ShuffleKind::kXor: return (lane ^ f.lane_arg) < base + f.width ? (lane ^ f.lane_arg) : -1;
    default: return -1;
  }
}

std::string block_text() { return "block " + coordinates(current.block_idx); }

// A block's threads are all waiting or exited: release a barrier, or fail.
bool settle(std::string* error) {
  Device& d = device();
  int exited = 0, at_barrier = 0;
  const Fiber* first_barrier = nullptr;
  const Fiber* first_exited = nullptr;
  for (int i = 0; i < d.threads; ++i) {
    const Fiber& f = *d.fibers[i];
    if (f.state == State::kShuffle) {
      // a shuffle that the last lane did not complete: say which lane is missing
      const int warp_first = f.linear - f.linear % kWarpSize;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (!(f.mask >> lane & 1u)) continue;
        const Fiber& other = *d.fibers[warp_first + lane];
        if (!same_shuffle(f, other)) {
          *error = std::string(shuffle_name(f.kind)) + " at " + describe(f.site) + " with mask " + hex_mask(f.mask) +
                   " in " + block_text() + ", warp " + std::to_string(f.linear / kWarpSize) + ": lane " +
                   std::to_string(lane) + " of the mask never arrived (" + whereabouts(other) +
                   "); every lane named by the mask must call it";
          return false;
        }
      }
      *error = "internal: a completed shuffle was left waiting";
      return false;
    }
    if (f.state == State::kExited) {
      ++exited;
      if (!first_exited) first_exited = &f;
    } else if (f.state == State::kBarrier) {
      ++at_barrier;
      if (!first_barrier) first_barrier = &f;
      else if (!same_site(f.site, first_barrier->site)) {
        *error = "threads of " + block_text() + " wait at different __syncthreads() call sites: thread " +
                 coordinates(first_barrier->index) + " at " + describe(first_barrier->site) + ", thread " +
                 coordinates(f.index) + " at " + describe(f.site) + "; a barrier must be reached by every thread "
                 "of the block at the same call";
        return false;
      }
    }
  }
  if (at_barrier == 0) return true;  // every thread exited
  if (exited > 0) {
    *error = "__syncthreads() at " + describe(first_barrier->site) + " in " + block_text() + " was reached by " +
             std::to_string(at_barrier) + " of the block's " + std::to_string(d.threads) + " threads; the other " +
             std::to_string(exited) + " had exited (first: thread " + coordinates(first_exited->index) +
             "); every thread of the block must reach it";
    return false;
  }
  for (int i = 0; i < d.threads; ++i) d.fibers[i]->state = State::kReady;
  return true;
}

bool run_block(std::string* error) {
  Device& d = device();
  std::memset(d.shared.data() + d.shared_offset, kNanByte, d.shared_bytes + kSharedRedzone);
  const dim3 dim = current.block_dim;
  for (int i = 0; i < d.threads; ++i) {
    Fiber& f = *d.fibers[i];
    f.index = uint3{i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)};
    f.linear = i;
    f.state = State::kReady;
  }
  ++counters().blocks;
  counters().threads += d.threads;
  const dim3 grid = current.grid_dim;
  const uint3 b = current.block_idx;
  const std::uint64_t block_rank = b.x + static_cast<std::uint64_t>(grid.x) * (b.y + static_cast<std::uint64_t>(grid.y) * b.z);
  const int warps = (d.threads + kWarpSize - 1) / kWarpSize;
  for (std::uint64_t round = block_rank % 2;; ++round) {
    const bool forward = round % 2 == 0;
    for (int k = 0; k < warps; ++k) {
      const int first = (forward ? k : warps - 1 - k) * kWarpSize;
      const int lanes = std::min(kWarpSize, d.threads - first);
      for (bool progressed = true; progressed;) {  // until no lane of the warp is ready
        progressed = false;
        for (int l = 0; l < lanes; ++l) {
          Fiber& f = *d.fibers[first + (forward ? l : lanes - 1 - l)];
          if (f.state != State::kReady) continue;
          progressed = true;
          resume(f);
          if (d.failed) {
            *error = d.error;
            return false;
          }
        }
      }
    }
    bool released_or_done = settle(error);
    if (!released_or_done) return false;
    bool all_exited = true;
    for (int i = 0; i < d.threads && all_exited; ++i) all_exited = d.fibers[i]->state == State::kExited;
    if (all_exited) break;
  }
  const unsigned char* redzone = d.shared.data() + d.shared_offset + d.shared_bytes;
  for (std::size_t k = 0; k < kSharedRedzone; ++k) {
    if (redzone[k] != kNanByte) {
      *error = block_text() + " wrote " + std::to_string(k) + " bytes past the end of its " +
               std::to_string(d.shared_bytes) + " bytes of dynamic shared memory";
      return false;
    }
  }
  return true;
}

}  // namespace

Counters& counters() {
  static Counters c;
  return c;
}

std::string describe(Site site) {
  const char* slash = std::strrchr(site.file, '/');
  return std::string(slash ? slash + 1 : site.file) + ":" + std::to_string(site.line);
}

bool run_grid(const LaunchConfig& config, void (*body)(void*), void* context, std::string* error) {
  Device& d = device();
  const int threads = static_cast<int>(config.block.x * config.block.y * config.block.z);
  make_fibers(threads);
  const std::size_t capacity = kMaxDynamicSharedOptin + kSharedRedzone + 128;
  if (d.shared.size() < capacity) d.shared.resize(capacity);
  d.shared_offset = (128 - reinterpret_cast<std::uintptr_t>(d.shared.data()) % 128) % 128;
  d.shared_bytes = config.shared_bytes;
  d.threads = threads;
  d.body = body;
  d.context = context;
  d.failed = false;
  ++counters().launches;
  current.block_dim = config.block;
  current.grid_dim = config.grid;
  bool ok = true;
  for (unsigned int z = 0; z < config.grid.z && ok; ++z)
    for (unsigned int y = 0; y < config.grid.y && ok; ++y)
      for (unsigned int x = 0; x < config.grid.x && ok; ++x) {
        current.block_idx = uint3{x, y, z};
        ok = run_block(error);
      }
  if (!ok) {
    *error = std::string("launch of ") + config.name + ": " + *error;
    for (int i = 0; i < threads; ++i) d.fibers[i]->entered = false;  // abandoned mid-kernel: restart them fresh
  }
  d.body = nullptr;
  d.context = nullptr;
  return ok;
}

void* dynamic_shared_memory() {
  running_thread("dynamic shared memory");
  Device& d = device();
  return d.shared.data() + d.shared_offset;
}

void syncthreads(Site site) {
  Fiber& f = running_thread("__syncthreads()");
  f.state = State::kBarrier;
  f.site = site;
  wait_here(f);
}

std::uint64_t shuffle_bits(Site site, ShuffleKind kind, unsigned int mask, std::uint64_t value, int lane_arg,
                           int width) {
  Fiber& f = running_thread(shuffle_name(kind));
  Device& d = device();
  const int lane = f.linear % kWarpSize;
  const int warp_first = f.linear - lane;
  const auto call = [&] {  // built only for an error: shuffles are the simulation's hottest path
    return std::string(shuffle_name(kind)) + " at " + describe(site) + " in " + block_text() + ", thread " +
           coordinates(f.index);
  };
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
    fail_in_thread(call() + ": width must be a power of 2 in [1, 32], got " + std::to_string(width));
  if (!(mask >> lane & 1u))
    fail_in_thread(call() + ": the mask " + hex_mask(mask) + " does not name the calling lane " + std::to_string(lane));
  f.state = State::kShuffle;
  f.site = site;
  f.kind = kind;
  f.mask = mask;
  f.lane_arg = lane_arg;
  f.width = width;
  f.value = value;
  bool complete = true;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (warp_first + l >= d.threads)
      fail_in_thread(call() + ": the mask " + hex_mask(mask) + " names lane " + std::to_string(l) +
                     ", which this block of " + std::to_string(d.threads) + " threads does not have");
    const Fiber& other = *d.fibers[warp_first + l];
    if (other.state == State::kExited)
      fail_in_thread(call() + ": lane " + std::to_string(l) + " of the mask " + hex_mask(mask) +
                     " exited before it; every lane named by the mask must call it");
    if (!same_shuffle(f, other)) complete = false;
  }
  if (!complete) {
    wait_here(f);
    return f.result;
  }
  // the last lane: every lane of the mask gets its source lane's value
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& target = *d.fibers[warp_first + l];
    const int source = source_lane(target, l);
    if (source >= 0 && !(mask >> source & 1u))
      fail_in_thread(std::string(shuffle_name(kind)) + " at " + describe(site) + " in " + block_text() + ": lane " +
                     std::to_string(l) + " reads lane " + std::to_string(source) + ", which is not in the mask " +
                     hex_mask(mask) + " (undefined in CUDA)");
    target.result = source >= 0 ? d.fibers[warp_first + source]->value : target.value;
  }
  for (int l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1u) d.fibers[warp_first + l]->state = State::kReady;
  return f.result;
}

void syncwarp(Site site, unsigned int mask) { shuffle_bits(site, ShuffleKind::kSync, mask, 0, 0, kWarpSize); }

}  // namespace eproj::sim
