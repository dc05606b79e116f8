// Vectorized row sweeps shared by the CPU kernels: exp, max and exp-sums over one row of logits.
//
// Why our own: the kernels spend their non-GEMM time in exp over [rows, vocab] blocks, and a
// loop calling std::exp is never vectorized (errno semantics; no libmvec without -ffast-math),
// while a sum over it is an ordered floating-point reduction the compiler may not reorder. Here
// exp is a branch-free polynomial the compiler vectorizes, and every reduction keeps kLanes
// independent partial sums (a fixed order: results are bitwise reproducible run to run).
//
// Accuracy of exp_f32 (Cephes expf scheme: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial in
// r, 2^n from the exponent bits): relative error <= 2 ulp on [-87.3, 88.7], checked against
// float64 exp by tests/test_row_math.py through the ops. Below -87.3 it returns 0 where libm
// returns a subnormal (< 1.2e-38 absolute); above 88.72 +inf; NaN stays NaN. float64 inputs
// keep libm's exp: they are the reference-grade path.
//
// Each float sweep is compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load
// time by the CPU (GCC target_clones, x86-64 Linux); elsewhere it is one portable build.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SGSD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SGSD_CLONES
#endif

namespace sgsd {

constexpr int kLanes = 16;

inline float exp_f32(float x) {
  // The exponent path sees x clamped; NaN fails both comparisons and flows through p.
  float xc = x < -87.33654f ? -87.33654f : x;
  xc = xc > 88.72283f ? 88.72283f : xc;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: the sum's low mantissa bits hold n.
  const float shifter = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split in two: exact n*hi
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  const int32_t e = tb - 0x4B400000;  // n as an integer (0x4B400000: the shifter's bits), in [-126, 128]
  const int32_t top = e > 127 ? 1 : 0;  // 2^128 is not a float: scale by 2^127, then by 2
  const int32_t bits = (e - top + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  float y = p * scale;
  y = top ? y * 2.0f : y;
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// log(1 + u) for u in [0, 1] (the JSD's log-add-exp): log of the rounded 1 + u, Cephes logf scheme
// (x = m 2^e, m in [sqrt(1/2), sqrt(2)), degree-8 polynomial in m - 1). Rounding 1 + u costs at
// most one ulp of 1 in absolute terms, which is what the caller adds it to anyway.
inline float log1p_unit_f32(float u) {
  const float x = 1.0f + u;
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mb = (bits & 0x007fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mb, sizeof m);
  const bool big = m > 1.41421356f;  // keep m - 1 in [sqrt(1/2) - 1, sqrt(2) - 1]
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = f * z * p + fe * -2.12194440e-4f - 0.5f * z;
  y = (f + y) + fe * 0.693359375f;
  return u != u ? u : y;  // NaN in, NaN out
}

inline float vexp(float x) { return exp_f32(x); }
inline double vexp(double x) { return std::exp(x); }

// max_j z[j] (-inf for n == 0).
[[maybe_unused]] SGSD_CLONES static float row_max(const float* z, int64_t n) {
  float lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = z[j + l] > lane[l] ? z[j + l] : lane[l];
  float m = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) m = z[j] > m ? z[j] : m;
  for (int l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
  return m;
}

[[maybe_unused]] static double row_max(const double* z, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

// s = sum_j exp(z[j] - shift) and, when t != nullptr, t = sum_j exp(z[j] - shift) * (z[j] - shift).
// float terms go into kLanes float partials for at most kBlock elements, then into double sums,
// so the rounding of a 150k-term row stays at the level of a 1k-term float sum.
constexpr int64_t kBlock = 1024;

// The float sweep behind exp_sums and exp_sums_store: Store writes exp(z - shift) to out (which
// may be z itself), WithT also sums e * d.
template <bool Store, bool WithT>
__attribute__((always_inline)) inline void exp_sums_f32(const float* z, int64_t n, float shift, float* out,
                                                        double* s, double* t) {
  double ss = 0, tt = 0;
  int64_t j = 0;
  for (; j + kLanes <= n;) {
    const int64_t end = j + kBlock < n ? j + kBlock : n;
    float ls[kLanes] = {}, lt[kLanes] = {};
    for (; j + kLanes <= end; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float d = z[j + l] - shift, e = exp_f32(d);
        if constexpr (Store) out[j + l] = e;
        ls[l] += e;
        if constexpr (WithT) lt[l] += e * d;
      }
    for (int l = 0; l < kLanes; ++l) {
      ss += ls[l];
      tt += lt[l];
    }
  }
  for (; j < n; ++j) {
    const float d = z[j] - shift, e = exp_f32(d);
    if constexpr (Store) out[j] = e;
    ss += e;
    tt += static_cast<double>(e) * d;
  }
  *s = ss;
  if constexpr (WithT) *t = tt;
}

[[maybe_unused]] SGSD_CLONES static void exp_sums(const float* z, int64_t n, float shift, double* s, double* t) {
  if (t != nullptr)
    exp_sums_f32<false, true>(z, n, shift, nullptr, s, t);
  else
    exp_sums_f32<false, false>(z, n, shift, nullptr, s, t);
}

[[maybe_unused]] static void exp_sums(const double* z, int64_t n, double shift, double* s, double* t) {
  double ss = 0, tt = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = z[j] - shift, e = std::exp(d);
    ss += e;
    tt += e * d;
  }
  *s = ss;
  if (t != nullptr) *t = tt;
}

// exp_sums that also overwrites z[j] with exp(z[j] - shift) (one exp per element for both).
[[maybe_unused]] SGSD_CLONES static void exp_sums_store(float* z, int64_t n, float shift, double* s, double* t) {
  if (t != nullptr)
    exp_sums_f32<true, true>(z, n, shift, z, s, t);
  else
    exp_sums_f32<true, false>(z, n, shift, z, s, t);
}

[[maybe_unused]] static void exp_sums_store(double* z, int64_t n, double shift, double* s, double* t) {
  double ss = 0, tt = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = z[j] - shift, e = std::exp(d);
    z[j] = e;
    ss += e;
    tt += e * d;
  }
  *s = ss;
  if (t != nullptr) *t = tt;
}

// out[j] = exp(x[j]) and out[j] = log(1 + x[j]) for x in [0, 1]: the transcendental passes of a
// block, kept in loops of their own (a loop that mixes them with other work defeats the vectorizer).
[[maybe_unused]] SGSD_CLONES static void exp_into(const float* __restrict__ x, int64_t n, float* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = exp_f32(x[j]);
}
[[maybe_unused]] static void exp_into(const double* __restrict__ x, int64_t n, double* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::exp(x[j]);
}
[[maybe_unused]] SGSD_CLONES static void log1p_unit_into(const float* __restrict__ x, int64_t n,
                                                         float* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = log1p_unit_f32(x[j]);
}
[[maybe_unused]] static void log1p_unit_into(const double* __restrict__ x, int64_t n, double* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::log1p(x[j]);
}

// out[j] = a * exp(z[j] - shift) (out may alias z).
[[maybe_unused]] SGSD_CLONES static void scaled_exp(const float* z, int64_t n, float shift, float a, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = a * exp_f32(z[j] - shift);
}

[[maybe_unused]] static void scaled_exp(const double* z, int64_t n, double shift, double a, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = a * std::exp(z[j] - shift);
}

}  // namespace sgsd
