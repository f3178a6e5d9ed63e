// See ../README.md: declarations only; nothing of gloo/common/error.h is used by the shim.
#pragma once
