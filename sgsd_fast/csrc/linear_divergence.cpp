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

// (max, log sum exp(z - max)) of one row
template <typename T>
void row_stats(const T* z, int64_t v, T* out) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < v; ++j) m = std::max(m, z[j]);
  double sum = 0.0;  // double: V up to ~2^18 terms of fp32 exp
  for (int64_t j = 0; j < v; ++j) sum += std::exp(z[j] - m);
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

// Per-entry summand e and its partial derivative w = de/ds (s free, P fixed).
template <typename T>
struct Entry {
  T e;
  T w;
};

template <typename T>
inline Entry<T> entry(Kind kind, T s, T t, T beta, T log_beta, T log_1mb) {
  const T q = std::exp(s);
  const T p = std::exp(t);
  switch (kind) {
    case Kind::kFkl:
      return {p * (t - s), -p};
    case Kind::kRkl:
      // the "+1" (from dQ/ds) cancels in the chain rule unless clipping masks some entries
      return {q * (s - t), q * (s - t + T(1))};
    case Kind::kJsd:
    default: {
      // log M = logaddexp(t + log beta, s + log(1 - beta)), stable when one side underflows
      const T a = t + log_beta, b = s + log_1mb;
      const T hi = std::max(a, b), lo = std::min(a, b);
      const T log_m = hi + std::log1p(std::exp(lo - hi));
      const T wq = (T(1) - beta) * q * (s - log_m);
      return {beta * p * (t - log_m) + wq, wq};
    }
  }
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
        const T* z = zsp + i * v;
        const T* y = ztp + i * v;
        const T ms = ssp[2 * i], ds = ssp[2 * i + 1];
        T st[2];
        row_stats(y, v, st);
        const T mt = st[0], dt = st[1];
        const T gg = need_grad ? ggp[i] : T(0);
        T* a = need_grad ? accp + i * v : nullptr;
        double row_loss = 0.0, row_w = 0.0;
        for (int64_t j = 0; j < v; ++j) {
          Entry<T> en = entry(kind, (z[j] - ms) - ds, (y[j] - mt) - dt, b, log_beta, log_1mb);
          // torch.clamp(max=c) passes the gradient where e <= c; match it so ties agree with autograd.
          const bool clipped = has_clip && en.e > clip;
          row_loss += clipped ? clip : en.e;
          if (need_grad && !clipped) {
            a[j] += gg * en.w;
            row_w += en.w;
          }
        }
        lossp[i] += gp[i] * static_cast<T>(row_loss);
        if (need_grad) rsp[i] += gg * static_cast<T>(row_w);
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
      for (int64_t i = rb; i < re; ++i) {
        const T* z = zsp + i * v;
        T* a = accp + i * v;
        const T ms = ssp[2 * i], ds = ssp[2 * i + 1], r = rsp[i];
        for (int64_t j = 0; j < v; ++j) a[j] = (a[j] - std::exp((z[j] - ms) - ds) * r) * sc;
      }
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
