// philox.h: counter-based noise, Philox4x32-10 and Box-Muller, host-device and torch-free; the twin of
// diffcore/reference/philox.py (same counter layout, key schedule and transform), so that one (seed, offset) gives
// the same noise on CPU, CUDA and the reference.
#pragma once

#include <stdint.h>

#include "fast_math.h"

namespace diffcore {
DC_ISA_BEGIN

// ---- counter-based noise: Philox4x32-10 (Salmon et al. 2011) and Box-Muller in double ----
struct Uint4 {
  uint32_t x, y, z, w;
};

DC_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(product >> 32);
  return (uint32_t)product;
}

DC_HD Uint4 philox4x32_10(Uint4 ctr, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, ctr.z, &hi1);
    ctr = Uint4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
  }
  return ctr;
}

template <typename real_t>
struct Normal4 {
  real_t v[4];
};

// Four standard normals for group g (= j / 4) of row b of a tensor whose first row is image `first_row` of the
// seed's image numbering: counter (g, first_row + b mod 2^32, offset lo, offset hi), key = seed. So an image's
// noise depends on its index in the seed's numbering, not on the row it has in a batch (the host functions refuse
// first_row + B > 2^32). Element j of the row takes lane j % 4. Box-Muller in real_t (float for float/half
// outputs, double for double): CPU and CUDA agree to a few ulps of real_t (their libm functions may round
// differently).
template <typename real_t>
DC_HD Normal4<real_t> philox_normal4(uint64_t seed, uint64_t offset, uint64_t first_row, int64_t b, uint64_t g) {
  const uint32_t image = (uint32_t)(first_row + (uint64_t)b);
  const Uint4 r = philox4x32_10(Uint4{(uint32_t)g, image, (uint32_t)offset, (uint32_t)(offset >> 32)},
                                (uint32_t)seed, (uint32_t)(seed >> 32));
  const real_t scale = (real_t)2.3283064365386963e-10;  // 2^-32
  const real_t two_pi_scale = (real_t)(6.283185307179586 * 2.3283064365386963e-10);
  // u = (r + 1) 2^-32 in (0, 1]; in float, r + 1 rounds to a multiple of 256 near 2^32, never to 0
  const real_t rad_a = dc_sqrt((real_t)-2 * dc_log(((real_t)r.x + (real_t)1) * scale));
  const real_t rad_b = dc_sqrt((real_t)-2 * dc_log(((real_t)r.z + (real_t)1) * scale));
  real_t sa, ca, sb, cb;
  dc_sincos(two_pi_scale * (real_t)r.y, &sa, &ca);
  dc_sincos(two_pi_scale * (real_t)r.w, &sb, &cb);
  Normal4<real_t> n;
  n.v[0] = rad_a * ca;
  n.v[1] = rad_a * sa;
  n.v[2] = rad_b * cb;
  n.v[3] = rad_b * sb;
  return n;
}

DC_ISA_END
}  // namespace diffcore
