// The simulated device's memory: allocations, copies, memset, pointer
// attributes.
//
// Every allocation lies between two 256-byte redzones and starts out filled
// with NaN bytes (0xff), so a read of memory never written shows up as NaN.
// After each launch runtime.cpp asks broken_redzone() whether a kernel wrote
// past an allocation (cudaErrorIllegalAddress). Copies must stay inside one
// allocation, and the copy kind must match the pointers.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "device.h"
#include "runtime_control.h"

namespace eproj::sim {

namespace {

constexpr std::size_t kRedzone = 256;
constexpr unsigned char kNanByte = 0xff;

struct Allocation {
  char* base;          // redzone, user bytes, padding and redzone
  std::size_t bytes;   // what was asked for
  std::size_t total;
};

struct Memory {
  std::mutex lock;
  std::map<std::uintptr_t, Allocation> allocations;  // by the pointer handed out
};

Memory& memory() {
  static Memory m;
  return m;
}

// The allocation that holds `pointer` (the lock held); null when none.
const Allocation* find_allocation(const void* pointer, std::uintptr_t* start) {
  Memory& r = memory();
  const auto p = reinterpret_cast<std::uintptr_t>(pointer);
  auto it = r.allocations.upper_bound(p);
  if (it == r.allocations.begin()) return nullptr;
  --it;
  if (p >= it->first + std::max<std::size_t>(it->second.bytes, 1)) return nullptr;
  *start = it->first;
  return &it->second;
}

// Whether [pointer, pointer + bytes) lies in one allocation; else records why not.
cudaError_t check_device_range(const void* pointer, std::size_t bytes, const char* call, const char* role) {
  Memory& r = memory();
  std::lock_guard<std::mutex> lock(r.lock);
  std::uintptr_t start = 0;
  const Allocation* a = find_allocation(pointer, &start);
  if (a == nullptr)
    return fail(cudaErrorInvalidValue, std::string(call) + ": the " + role + " " + address(pointer) +
                                           " is not memory of the simulated device");
  const auto offset = reinterpret_cast<std::uintptr_t>(pointer) - start;
  if (offset + bytes > a->bytes)
    return fail(cudaErrorInvalidValue, std::string(call) + ": " + std::to_string(bytes) + " bytes at " +
                                           role + " " + address(pointer) + " run past the end of its " +
                                           std::to_string(a->bytes) + "-byte allocation (offset " +
                                           std::to_string(offset) + ")");
  return cudaSuccess;
}

bool is_device_pointer(const void* pointer) {
  Memory& r = memory();
  std::lock_guard<std::mutex> lock(r.lock);
  std::uintptr_t start = 0;
  return find_allocation(pointer, &start) != nullptr;
}

}  // namespace

std::string broken_redzone() {
  Memory& r = memory();
  std::lock_guard<std::mutex> lock(r.lock);
  for (const auto& [start, a] : r.allocations) {
    const auto* user = reinterpret_cast<const unsigned char*>(start);
    const auto* base = reinterpret_cast<const unsigned char*>(a.base);
    for (const unsigned char* q = base; q < user; ++q)
      if (*q != kNanByte)
        return "a write " + std::to_string(user - q) + " bytes before the " + std::to_string(a.bytes) +
               "-byte allocation at " + address(user);
    for (const unsigned char* q = user + a.bytes; q < base + a.total; ++q)
      if (*q != kNanByte)
        return "a write " + std::to_string(q - user - a.bytes) + " bytes past the end of the " +
               std::to_string(a.bytes) + "-byte allocation at " + address(user);
  }
  return "";
}

namespace {

cudaError_t allocate(void** pointer, std::size_t bytes, const char* call) {
  if (pointer == nullptr) return fail(cudaErrorInvalidValue, std::string(call) + ": the result pointer is null");
  if (cudaError_t e = sticky_error()) return e;
  *pointer = nullptr;
  if (bytes == 0) return cudaSuccess;
  const std::size_t padded = (bytes + kRedzone - 1) / kRedzone * kRedzone;
  const std::size_t total = kRedzone + padded + kRedzone;
  auto* base = static_cast<char*>(std::aligned_alloc(kRedzone, total));
  if (base == nullptr)
    return fail(cudaErrorMemoryAllocation, std::string(call) + ": " + std::to_string(bytes) + " bytes");
  std::memset(base, kNanByte, total);
  Memory& r = memory();
  std::lock_guard<std::mutex> lock(r.lock);
  r.allocations[reinterpret_cast<std::uintptr_t>(base + kRedzone)] = Allocation{base, bytes, total};
  *pointer = base + kRedzone;
  return cudaSuccess;
}

cudaError_t release(void* pointer, const char* call) {
  if (pointer == nullptr) return cudaSuccess;
  Memory& r = memory();
  {
    std::lock_guard<std::mutex> lock(r.lock);
    auto it = r.allocations.find(reinterpret_cast<std::uintptr_t>(pointer));
    if (it == r.allocations.end())
      return fail(cudaErrorInvalidValue, std::string(call) + ": " + address(pointer) +
                                             " is not the start of an allocation of the simulated device");
    std::free(it->second.base);  // freed even with a sticky error: the harness goes on after one
    r.allocations.erase(it);
  }
  return sticky_error();
}

}  // namespace

std::int64_t allocation_count() {
  Memory& r = memory();
  std::lock_guard<std::mutex> lock(r.lock);
  return static_cast<std::int64_t>(r.allocations.size());
}

}  // namespace eproj::sim

using eproj::sim::fail;

// ---------------------------------------------------------------------------
// memory
// ---------------------------------------------------------------------------

cudaError_t cudaMalloc(void** pointer, std::size_t bytes) { return eproj::sim::allocate(pointer, bytes, "cudaMalloc"); }

cudaError_t cudaFree(void* pointer) { return eproj::sim::release(pointer, "cudaFree"); }

cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t stream) {
  if (cudaError_t e = eproj::sim::check_stream(stream, "cudaMallocAsync")) return e;
  return eproj::sim::allocate(pointer, bytes, "cudaMallocAsync");
}

cudaError_t cudaFreeAsync(void* pointer, cudaStream_t stream) {
  if (cudaError_t e = eproj::sim::check_stream(stream, "cudaFreeAsync")) return e;
  return eproj::sim::release(pointer, "cudaFreeAsync");
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  using namespace eproj::sim;
  if (cudaError_t e = check_stream(stream, "cudaMemcpyAsync")) return e;
  if (cudaError_t e = sticky_error()) return e;
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault)
    return fail(cudaErrorInvalidValue, "cudaMemcpy: kind " + std::to_string(kind) + " is not a cudaMemcpyKind");
  if (bytes == 0) return cudaSuccess;
  if (kind == cudaMemcpyDefault)
    kind = is_device_pointer(dst) ? (is_device_pointer(src) ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                  : (is_device_pointer(src) ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (dst_device) {
    if (cudaError_t e = check_device_range(dst, bytes, "cudaMemcpy", "destination")) return e;
  } else if (is_device_pointer(dst)) {
    return fail(cudaErrorInvalidValue, "cudaMemcpy: the destination " + address(dst) +
                                           " is device memory, but the kind says host");
  }
  if (src_device) {
    if (cudaError_t e = check_device_range(src, bytes, "cudaMemcpy", "source")) return e;
  } else if (is_device_pointer(src)) {
    return fail(cudaErrorInvalidValue, "cudaMemcpy: the source " + address(src) +
                                           " is device memory, but the kind says host");
  }
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}

cudaError_t cudaMemset(void* pointer, int value, std::size_t bytes) {
  using namespace eproj::sim;
  if (cudaError_t e = sticky_error()) return e;
  if (bytes == 0) return cudaSuccess;
  if (cudaError_t e = check_device_range(pointer, bytes, "cudaMemset", "destination")) return e;
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer) {
  if (attributes == nullptr) return fail(cudaErrorInvalidValue, "cudaPointerGetAttributes: null attributes");
  const bool device = eproj::sim::is_device_pointer(pointer);
  attributes->type = device ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered;
  attributes->device = device ? 0 : -2;
  attributes->devicePointer = device ? const_cast<void*>(pointer) : nullptr;
  attributes->hostPointer = device ? nullptr : const_cast<void*>(pointer);
  return cudaSuccess;
}
