// See ../README.md: the names only (held through smart pointers in ProcessGroupGloo).
#pragma once
namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo
