// See README.md: declarations only; nothing of gloo/algorithm.h is used by the shim.
#pragma once
