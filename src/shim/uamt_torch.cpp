// What tch 0.24 does not expose, on libtorch's device-generic C++ API (no CUDA headers needed,
// so it builds against any libtorch; the CUDA calls fail cleanly where no CUDA backend or GPU is):
//
// - autocast to bfloat16 on the calling thread (autocast state is thread-local in libtorch);
// - TF32 for cuDNN convolutions and cuBLAS matmuls;
// - CUDA streams from libtorch's pool, made current on the calling thread, events to order
//   hand-offs between streams, and record_stream so the caching allocator does not reuse a
//   tensor's memory while another stream may still read it;
// - a CUDA device's free and total memory, from the caching allocator's device-generic interface.
//
// Every function returns 0 on success and -1 on failure; uamt_last_error() then says why.

#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <cstring>
#include <exception>

#include "guard.hpp"

namespace {

thread_local char last_error[1024] = {0};

void set_error(const char* what) {
  std::strncpy(last_error, what, sizeof last_error - 1);
  last_error[sizeof last_error - 1] = 0;
}

using uamt_shim::guarded;

c10::DeviceType device_type(int cuda) {
  return cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
}

c10::Stream cuda_stream(int device, int64_t id) {
  return c10::Stream::unpack3(id, static_cast<c10::DeviceIndex>(device), c10::DeviceType::CUDA);
}

}  // namespace

extern "C" {

const char* uamt_last_error() { return last_error; }

// For the shim's other files (uamt_dist.cpp).
void uamt_set_last_error(const char* what) { set_error(what); }

// Turns bfloat16 autocast on for `cuda` (1) or the CPU (0) on this thread; `*was` receives
// whether it was on before, for uamt_autocast_exit.
int uamt_autocast_enter(int cuda, int* was) {
  return guarded([&] {
    auto t = device_type(cuda);
    *was = at::autocast::is_autocast_enabled(t) ? 1 : 0;
    at::autocast::set_autocast_dtype(t, at::kBFloat16);
    at::autocast::set_autocast_enabled(t, true);
    at::autocast::increment_nesting();
  });
}

// Leaves the region uamt_autocast_enter opened: restores the previous state and, when the
// outermost region ends, drops the cache of weights cast to bfloat16.
int uamt_autocast_exit(int cuda, int was) {
  return guarded([&] {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device_type(cuda), was != 0);
  });
}

int uamt_autocast_enabled(int cuda, int* on) {
  return guarded([&] { *on = at::autocast::is_autocast_enabled(device_type(cuda)) ? 1 : 0; });
}

// TF32 tensor cores for cuDNN convolutions and cuBLAS matmuls (process-wide).
int uamt_set_tf32(int on) {
  return guarded([&] {
    at::globalContext().setAllowTF32CuDNN(on != 0);
    at::globalContext().setAllowTF32CuBLAS(on != 0);
  });
}

int uamt_tf32_enabled(int* on) {
  return guarded([&] { *on = (at::globalContext().allowTF32CuDNN() && at::globalContext().allowTF32CuBLAS()) ? 1 : 0; });
}

// A stream of CUDA device `device` from libtorch's pool.
int uamt_stream_from_pool(int device, int64_t* id) {
  return guarded([&] {
    auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    auto s = impl->getStreamFromGlobalPool(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)), false);
    *id = s.id();
  });
}

// Makes the stream current for its device on the calling thread; `*previous` receives the id of
// the stream that was.
int uamt_stream_set_current(int device, int64_t id, int64_t* previous) {
  return guarded([&] {
    auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    *previous = impl->exchangeStream(cuda_stream(device, id)).id();
  });
}

// The id of the calling thread's current stream on `device`.
int uamt_stream_current(int device, int64_t* id) {
  return guarded([&] {
    auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    *id = impl->getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device))).id();
  });
}

int uamt_stream_synchronize(int device, int64_t id) {
  return guarded([&] { cuda_stream(device, id).synchronize(); });
}

// A new event recorded on the stream: work queued on it so far.
int uamt_event_record(int device, int64_t stream, void** event) {
  return guarded([&] {
    auto e = new c10::Event(c10::DeviceType::CUDA);
    try {
      e->record(cuda_stream(device, stream));
    } catch (...) {
      delete e;
      throw;
    }
    *event = e;
  });
}

// Work queued on `stream` from now on waits for the event (on the device; the host goes on).
int uamt_event_block(void* event, int device, int64_t stream) {
  return guarded([&] { static_cast<c10::Event*>(event)->block(cuda_stream(device, stream)); });
}

void uamt_event_free(void* event) { delete static_cast<c10::Event*>(event); }

// Tells the caching allocator that `stream` uses the tensor's memory: it is not handed out again
// until the work queued on that stream so far has finished.
int uamt_tensor_record_stream(void* tensor, int device, int64_t stream) {
  return guarded([&] { static_cast<at::Tensor*>(tensor)->record_stream(cuda_stream(device, stream)); });
}

// Free and total bytes of CUDA device `device`, as the caching allocator reads them from the
// driver (cudaMemGetInfo). Fails cleanly where libtorch has no CUDA backend or no such device.
int uamt_cuda_memory(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  return guarded([&] {
    auto info = at::getDeviceAllocator(c10::DeviceType::CUDA)->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free_bytes = static_cast<uint64_t>(info.first);
    *total_bytes = static_cast<uint64_t>(info.second);
  });
}

}  // extern "C"
