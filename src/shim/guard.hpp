// What every function of the shim does with C++ exceptions: none crosses into Rust. A function
// runs its body through guarded(), which returns 0, or -1 after recording the exception's text
// for uamt_last_error() (defined in uamt_torch.cpp, thread-local).
#pragma once

#include <exception>

extern "C" void uamt_set_last_error(const char* what);

namespace uamt_shim {

template <class F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    uamt_set_last_error(e.what());
  } catch (...) {
    uamt_set_last_error("unknown C++ exception");
  }
  return -1;
}

}  // namespace uamt_shim
