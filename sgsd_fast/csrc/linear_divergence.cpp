// Row kernels of the fused multi-teacher divergence (sgsd_fast.ops.linear_divergence), CPU.
//
// The Python driver owns the token chunking and the GEMMs; these three operators do the
// per-row vocabulary sweeps on a chunk of fp32 (or fp64) logits that are already divided by
// the temperature:
//
//   linear_divergence_stats(z)                     -> [C, 2]: row max m and log sum_j exp(z_j - m)
//   linear_divergence_accumulate(z_s, stats_s, z_t, gate, grad_gate, loss!, acc!, rowsum!, ...)
//       one teacher: its own LSE (sweep 1), then per entry (sweep 2) the clipped summand into
//       loss and, when gradients are wanted, w = dL/ds (s = student log-softmax, treated as free)
//       into acc and sum_j w_j into rowsum.
//   linear_divergence_finalize(z_s, stats_s, acc!, rowsum, scale)
//       acc <- (acc - softmax(z_s) * rowsum) * scale, the chain rule through the log-softmax.
//
// Why dL/ds: a loss that depends on z only through s = log_softmax(z) has
// dL/dz_i = dL/ds_i - Q_i * sum_j dL/ds_j, so every teacher, divergence kind and per-entry clip
// reduces to an elementwise term plus one row scalar, both accumulable teacher by teacher in a
// single sweep once the LSEs are known. Per-entry clipping only masks an entry's own w_j.
//
// Log-probabilities are formed as (z - m) - log_d, not z - lse: with logits of magnitude ~30,
// rounding lse to fp32 shifts every log-probability by ~eps*|z| (measured: 6x the RKL gradient
// error of torch.log_softmax, which uses the same split, at logits ~25).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "row_math.h"

namespace {

enum class Kind { kFkl, kRkl, kJsd };

Kind parse_kind(const std::string& kind) {
  if (kind == "fkl") return Kind::kFkl;
  if (kind == "rkl") return Kind::kRkl;
  if (kind == "jsd") return Kind::kJsd;
  TORCH_CHECK(false, "linear_divergence: kind must be 'fkl', 'rkl' or 'jsd', got '", kind, "'");
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), "linear_divergence: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "linear_divergence: ", name, " must be contiguous");
  if (cols < 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "linear_divergence: ", name, " must have shape [",
                rows, "], got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "linear_divergence: ", name,
                " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  }
}

// Rows per parallel task: tiny chunks (tests, short sequences) stay on one thread instead of
// paying a thread-pool fan-out that costs more than the sweep.
int64_t grain_rows(int64_t v) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)); }

void check_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "linear_divergence: ", name, " must have dtype ",
              ref.scalar_type(), " like student_logits, got ", t.scalar_type());
}

// (max, log sum exp(z - max)) of one row; the sum runs in double (V up to ~2^18 terms).
template <typename T>
void row_stats(const T* z, int64_t v, T* out) {
  const T m = sgsd::row_max(z, v);
  double sum = 0.0;
  sgsd::exp_sums(z, v, m, &sum, nullptr);
  out[0] = m;
  out[1] = static_cast<T>(std::log(sum));
}

at::Tensor stats_cpu(const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 2, "linear_divergence_stats: logits must be [C, V], got ", z.sizes());
  check_rows(z, "logits", z.size(0), z.size(1));
  auto out = at::empty({z.size(0), 2}, z.options());
  const int64_t v = z.size(1);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_divergence_stats", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, z.size(0), grain_rows(v), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) row_stats(zp + i * v, v, op + 2 * i);
    });
  });
  return out;
}

// One row of the fused sweep: sum_j min(e_j, clip) into *loss and, with Grad, gg * w_j into a[j]
// and sum_j w_j into *wsum, where e_j is the summand of the divergence and w_j = de_j/ds_j (s free,
// P fixed; a clipped entry has w_j = 0, as torch.clamp(max=c) passes the gradient where e <= c).
// s_j = (z_j - ms) - ds and t_j = (y_j - mt) - dt are the student's and teacher's log-probs.
// A row is processed in blocks of kBlock entries: the log-probs s, t, then the exps (and the
// JSD's log1p) in passes of their own (sgsd::exp_into, vectorized per ISA: GCC does not vectorize
// the fused loop), then one arithmetic pass forms e and w. Sums go through kLanes float partials
// per block (fixed order), then double.
template <typename T, Kind K, bool Grad, bool Clip>
__attribute__((always_inline)) inline void accumulate_row(const T* __restrict__ z, const T* __restrict__ y, int64_t v,
                                                          T ms, T ds, T mt, T dt, T beta, T log_beta, T log_1mb,
                                                          T clip, T gg, T* __restrict__ a, double* loss,
                                                          double* wsum) {
  constexpr int L = sgsd::kLanes;
  constexpr int64_t B = sgsd::kBlock;
  T s[B], t[B], p[B], q[B], u[B], r[B];
  double l_total = 0, w_total = 0;
  for (int64_t j0 = 0; j0 < v; j0 += B) {
    const int64_t n = v - j0 < B ? v - j0 : B;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = (z[j0 + j] - ms) - ds;
      t[j] = (y[j0 + j] - mt) - dt;
    }
    if constexpr (K != Kind::kRkl) sgsd::exp_into(t, n, p);
    if constexpr (K != Kind::kFkl) sgsd::exp_into(s, n, q);
    if constexpr (K == Kind::kJsd) {
      // log M = logaddexp(t + log beta, s + log(1 - beta)) = hi + log1p(exp(lo - hi)), stable when
      // one side underflows; u holds lo - hi, r its exp, then u = log1p(r).
      for (int64_t j = 0; j < n; ++j) {
        const T lo_a = t[j] + log_beta, lo_b = s[j] + log_1mb;
        u[j] = lo_a > lo_b ? lo_b - lo_a : lo_a - lo_b;
      }
      sgsd::exp_into(u, n, r);
      sgsd::log1p_unit_into(r, n, u);
    }
    T le[L] = {}, lw[L] = {};
    int64_t j = 0;
    auto one = [&](int64_t jj, T& e_acc, T& w_acc) {
      T e, w;
      if constexpr (K == Kind::kFkl) {
        e = p[jj] * (t[jj] - s[jj]);
        w = -p[jj];
      } else if constexpr (K == Kind::kRkl) {
        // the "+1" (from dQ/ds) cancels in the chain rule unless clipping masks some entries
        e = q[jj] * (s[jj] - t[jj]);
        w = q[jj] * (s[jj] - t[jj] + T(1));
      } else {
        const T lo_a = t[jj] + log_beta, lo_b = s[jj] + log_1mb;
        const T log_m = (lo_a > lo_b ? lo_a : lo_b) + u[jj];
        const T wq = (T(1) - beta) * q[jj] * (s[jj] - log_m);
        e = beta * p[jj] * (t[jj] - log_m) + wq;
        w = wq;
      }
      if constexpr (Clip) {
        // torch.clamp(max=c) passes the gradient where e <= c; match it so ties agree with autograd.
        const bool clipped = e > clip;
        e = clipped ? clip : e;
        w = clipped ? T(0) : w;
      }
      e_acc += e;
      w_acc += w;
      if constexpr (Grad) a[j0 + jj] += gg * w;
    };
    for (; j + L <= n; j += L)
      for (int l = 0; l < L; ++l) one(j + l, le[l], lw[l]);
    for (; j < n; ++j) one(j, le[0], lw[0]);
    for (int l = 0; l < L; ++l) {
      l_total += le[l];
      w_total += lw[l];
    }
  }
  *loss = l_total;
  *wsum = Grad ? w_total : 0.0;
}

// The 12 (kind, gradient, clip) variants behind one call; the float one compiled per ISA.
#define SGSD_ACCUMULATE_ROW_ARGS(T)                                                                       \
  Kind kind, bool grad, bool clip_on, const T *z, const T *y, int64_t v, T ms, T ds, T mt, T dt, T beta, \
      T log_beta, T log_1mb, T clip, T gg, T *a, double *loss, double *wsum
#define SGSD_ACCUMULATE_ROW_BODY(T)                                                                        \
  const int variant = static_cast<int>(kind) * 4 + (grad ? 2 : 0) + (clip_on ? 1 : 0);                    \
  switch (variant) {                                                                                       \
    SGSD_CASE(T, 0, Kind::kFkl, false, false) SGSD_CASE(T, 1, Kind::kFkl, false, true)                     \
    SGSD_CASE(T, 2, Kind::kFkl, true, false) SGSD_CASE(T, 3, Kind::kFkl, true, true)                       \
    SGSD_CASE(T, 4, Kind::kRkl, false, false) SGSD_CASE(T, 5, Kind::kRkl, false, true)                     \
    SGSD_CASE(T, 6, Kind::kRkl, true, false) SGSD_CASE(T, 7, Kind::kRkl, true, true)                       \
    SGSD_CASE(T, 8, Kind::kJsd, false, false) SGSD_CASE(T, 9, Kind::kJsd, false, true)                     \
    SGSD_CASE(T, 10, Kind::kJsd, true, false) SGSD_CASE(T, 11, Kind::kJsd, true, true)                     \
  }
#define SGSD_CASE(T, N, K, G, C)                                                                \
  case N:                                                                                       \
    accumulate_row<T, K, G, C>(z, y, v, ms, ds, mt, dt, beta, log_beta, log_1mb, clip, gg, a, loss, wsum); \
    break;

SGSD_CLONES static void accumulate_row_any(SGSD_ACCUMULATE_ROW_ARGS(float)) { SGSD_ACCUMULATE_ROW_BODY(float) }
static void accumulate_row_any(SGSD_ACCUMULATE_ROW_ARGS(double)) { SGSD_ACCUMULATE_ROW_BODY(double) }

#undef SGSD_CASE
#undef SGSD_ACCUMULATE_ROW_BODY
#undef SGSD_ACCUMULATE_ROW_ARGS

// a[j] <- (a[j] - softmax(z)_j * r) * sc, softmax_j = exp((z_j - ms) - ds).
template <typename T>
__attribute__((always_inline)) inline void finalize_row_impl(const T* z, int64_t v, T ms, T ds, T r, T sc, T* a) {
  for (int64_t j = 0; j < v; ++j) a[j] = (a[j] - sgsd::vexp((z[j] - ms) - ds) * r) * sc;
}
SGSD_CLONES static void finalize_row(const float* z, int64_t v, float ms, float ds, float r, float sc, float* a) {
  finalize_row_impl(z, v, ms, ds, r, sc, a);
}
static void finalize_row(const double* z, int64_t v, double ms, double ds, double r, double sc, double* a) {
  finalize_row_impl(z, v, ms, ds, r, sc, a);
}

void accumulate_cpu(const at::Tensor& zs, const at::Tensor& stats_s, const at::Tensor& zt,
                    const at::Tensor& gate, const at::Tensor& grad_gate, at::Tensor loss,
                    at::Tensor acc, at::Tensor rowsum, std::string kind_name, double beta,
                    std::optional<double> entry_clip, bool need_grad) {
  const Kind kind = parse_kind(kind_name);
  TORCH_CHECK(zs.dim() == 2, "linear_divergence_accumulate: student_logits must be [C, V], got ", zs.sizes());
  const int64_t c = zs.size(0), v = zs.size(1);
  check_rows(zs, "student_logits", c, v);
  check_rows(zt, "teacher_logits", c, v);
  check_rows(stats_s, "student_stats", c, 2);
  check_rows(gate, "gate", c, -1);
  check_rows(loss, "loss", c, -1);
  if (need_grad) {
    check_rows(grad_gate, "grad_gate", c, -1);
    check_rows(acc, "acc", c, v);
    check_rows(rowsum, "rowsum", c, -1);
  }
  check_dtype(stats_s, "student_stats", zs);
  check_dtype(zt, "teacher_logits", zs);
  check_dtype(gate, "gate", zs);
  check_dtype(loss, "loss", zs);
  if (need_grad) {
    check_dtype(grad_gate, "grad_gate", zs);
    check_dtype(acc, "acc", zs);
    check_dtype(rowsum, "rowsum", zs);
  }
  TORCH_CHECK(kind != Kind::kJsd || (beta > 0.0 && beta < 1.0),
              "linear_divergence_accumulate: kind='jsd' needs beta in (0, 1) (0 and 1 map to fkl/rkl), got ", beta);

  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "linear_divergence_accumulate", [&] {
    using T = scalar_t;
    const T* zsp = zs.data_ptr<T>();
    const T* ztp = zt.data_ptr<T>();
    const T* ssp = stats_s.data_ptr<T>();
    const T* gp = gate.data_ptr<T>();
    T* lossp = loss.data_ptr<T>();
    const T* ggp = need_grad ? grad_gate.data_ptr<T>() : nullptr;
    T* accp = need_grad ? acc.data_ptr<T>() : nullptr;
    T* rsp = need_grad ? rowsum.data_ptr<T>() : nullptr;
    const T b = static_cast<T>(beta);
    const T log_beta = kind == Kind::kJsd ? static_cast<T>(std::log(beta)) : T(0);
    const T log_1mb = kind == Kind::kJsd ? static_cast<T>(std::log1p(-beta)) : T(0);
    const bool has_clip = entry_clip.has_value();
    const T clip = has_clip ? static_cast<T>(*entry_clip) : T(0);
    at::parallel_for(0, c, grain_rows(v), [&](int64_t rb, int64_t re) {
      for (int64_t i = rb; i < re; ++i) {
        const T* y = ztp + i * v;
        T st[2];
        row_stats(y, v, st);
        double row_loss = 0.0, row_w = 0.0;
        accumulate_row_any(kind, need_grad, has_clip, zsp + i * v, y, v, ssp[2 * i], ssp[2 * i + 1], st[0], st[1], b,
                           log_beta, log_1mb, clip, need_grad ? ggp[i] : T(0), need_grad ? accp + i * v : nullptr,
                           &row_loss, &row_w);
        lossp[i] += gp[i] * static_cast<T>(row_loss);
        if (need_grad) rsp[i] += ggp[i] * static_cast<T>(row_w);
      }
    });
  });
}

void finalize_cpu(const at::Tensor& zs, const at::Tensor& stats_s, at::Tensor acc, const at::Tensor& rowsum,
                  double scale) {
  TORCH_CHECK(zs.dim() == 2, "linear_divergence_finalize: student_logits must be [C, V], got ", zs.sizes());
  const int64_t c = zs.size(0), v = zs.size(1);
  check_rows(zs, "student_logits", c, v);
  check_rows(acc, "acc", c, v);
  check_rows(stats_s, "student_stats", c, 2);
  check_rows(rowsum, "rowsum", c, -1);
  check_dtype(stats_s, "student_stats", zs);
  check_dtype(acc, "acc", zs);
  check_dtype(rowsum, "rowsum", zs);
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "linear_divergence_finalize", [&] {
    using T = scalar_t;
    const T* zsp = zs.data_ptr<T>();
    const T* ssp = stats_s.data_ptr<T>();
    const T* rsp = rowsum.data_ptr<T>();
    T* accp = acc.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    at::parallel_for(0, c, grain_rows(v), [&](int64_t rb, int64_t re) {
      for (int64_t i = rb; i < re; ++i)
        finalize_row(zsp + i * v, v, ssp[2 * i], ssp[2 * i + 1], rsp[i], sc, accp + i * v);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgsd_fast, m) {
  m.def("linear_divergence_stats(Tensor logits) -> Tensor");
  m.def(
      "linear_divergence_accumulate(Tensor student_logits, Tensor student_stats, Tensor teacher_logits, "
      "Tensor gate, Tensor grad_gate, Tensor(a!) loss, Tensor(b!) acc, Tensor(c!) rowsum, str kind, "
      "float beta, float? entry_clip, bool need_grad) -> ()");
  m.def(
      "linear_divergence_finalize(Tensor student_logits, Tensor student_stats, Tensor(a!) acc, Tensor rowsum, "
      "float scale) -> ()");
}

TORCH_LIBRARY_IMPL(sgsd_fast, CPU, m) {
  m.impl("linear_divergence_stats", &stats_cpu);
  m.impl("linear_divergence_accumulate", &accumulate_cpu);
  m.impl("linear_divergence_finalize", &finalize_cpu);
}
