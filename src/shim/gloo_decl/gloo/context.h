// See README.md: the name, and the one method an inline function of ProcessGroupGloo calls
// (setTimeout, which the shim never calls).
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
