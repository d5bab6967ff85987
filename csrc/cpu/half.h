// half.h: float16 and bfloat16 storage types for the CPU kernels, torch-free so that the per-ISA kernel variants
// include no torch header. The conversions are c10's portable ones, bit for bit (c10::Half without
// CPU_CAPABILITY: FP16's fp16_ieee_from/to_fp32_value, round to nearest even; c10::BFloat16: round to nearest
// even, NaN -> 0x7FC0), written with integer and float arithmetic only.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dispatch.h"

namespace diffcore {
DC_ISA_BEGIN
namespace cpu_half {

DC_HD float float_from_bits(uint32_t w) {
  float f;
  memcpy(&f, &w, sizeof(f));
  return f;
}

DC_HD uint32_t float_to_bits(float f) {
  uint32_t w;
  memcpy(&w, &f, sizeof(w));
  return w;
}

DC_HD float half_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
  return float_from_bits(result);
}

DC_HD uint16_t half_from_float(float f) {
  float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = float_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

DC_HD float bfloat16_to_float(uint16_t b) { return float_from_bits((uint32_t)b << 16); }

DC_HD uint16_t bfloat16_from_float(float f) {
  const uint32_t w = float_to_bits(f);
  const uint32_t rounded = (w + (((w >> 16) & 1u) + 0x7FFFu)) >> 16;
  return f != f ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

}  // namespace cpu_half

// Storage types: constructed from float (rounded to nearest even), converted to float exactly.
struct Half {
  uint16_t bits;
  Half() = default;
  DC_HD explicit Half(float f) : bits(cpu_half::half_from_float(f)) {}
  DC_HD explicit operator float() const { return cpu_half::half_to_float(bits); }
};

struct BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  DC_HD explicit BFloat16(float f) : bits(cpu_half::bfloat16_from_float(f)) {}
  DC_HD explicit operator float() const { return cpu_half::bfloat16_to_float(bits); }
};

DC_ISA_END
}  // namespace diffcore
