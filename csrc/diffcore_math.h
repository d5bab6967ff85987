// diffcore_math.h: everything the fused kernels compute, one include for both backends. The C++ headers mirror
// diffcore/reference/: formulas.h (formulas.py and the per-element part of ops.py), philox.h (philox.py), and
// fast_math.h (the vectorizable exp / log / sin / cos and NaN-propagating min / max / clamp they use).
// Torch-free: nvcc compiles it on a machine whose torch is a CPU build.
#pragma once

#include "fast_math.h"
#include "formulas.h"
#include "philox.h"
