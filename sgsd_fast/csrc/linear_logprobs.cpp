// CPU kernels of sgsd_fast.ops.linear_logprobs: per-row log p(target), log-sum-exp and entropy of
// softmax(hidden @ weight^T / temperature), and the store-free backward, without ever holding more
// than one [chunk_rows, vocab_tile] block of logits.
//
// Layout of the work: an outer loop over row chunks and an inner loop over vocabulary tiles. Each
// (chunk, tile) block of logits comes from one ATen GEMM (multi-threaded BLAS); the per-element
// softmax work is split across rows with at::parallel_for. Math runs in float32 for
// float32/bfloat16/float16 inputs and in float64 for float64 inputs; half-precision inputs are
// upcast one chunk/tile at a time, so logits are never rounded to bf16.
//
// The Python side (sgsd_fast/ops/linear_logprobs.py) validates arguments, drops ignore_index rows
// before calling in here, and chooses chunk_rows / vocab_tile from a workspace byte budget.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "row_math.h"

namespace {

// Rows per parallel_for task: about 32k elements (~0.1 ms of exp-bound work each), so small
// blocks run inline instead of paying a thread wake-up per tile.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, cols)); }

at::ScalarType math_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  double temperature, int64_t chunk_rows, int64_t vocab_tile) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "linear_logprobs (cpu): all tensors must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "linear_logprobs (cpu): hidden must be [N, H], weight [V, H]");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "linear_logprobs (cpu): hidden.shape[1] must equal weight.shape[1]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_logprobs (cpu): hidden and weight dtypes differ");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "linear_logprobs (cpu): targets must be int64 of shape [N]");
  TORCH_CHECK(temperature > 0, "linear_logprobs (cpu): temperature must be positive");
  TORCH_CHECK(chunk_rows > 0 && vocab_tile > 0, "linear_logprobs (cpu): chunk_rows and vocab_tile must be positive");
}

// The kernels index logits by target; an id outside [0, V) would silently pick nothing.
const int64_t* checked_targets(const at::Tensor& targets, int64_t vocab) {
  const int64_t* p = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < vocab, "linear_logprobs (cpu): targets must lie in [0, V) = [0, ", vocab,
                "), got ", p[i], "; ignore_index rows must be dropped before calling the op");
  return p;
}

// Rows of `hidden` in [r0, r0 + rows) in the math dtype, pre-scaled by 1/temperature so that one
// GEMM yields the scaled logits (cheaper than scaling the [rows, tile] block afterwards).
at::Tensor scaled_rows(const at::Tensor& hidden, int64_t r0, int64_t rows, at::ScalarType mt, double inv_temp) {
  at::Tensor h = hidden.narrow(0, r0, rows).to(mt).contiguous();
  return inv_temp == 1.0 ? h : h.mul(inv_temp);
}

// Running softmax statistics of one row, kept relative to the running max m:
// s = sum exp(z - m), t = sum exp(z - m) * (z - m), both in double. Keeping t relative to m
// (instead of sum p*z) avoids the cancellation lse - E[z] when logits carry a large common offset.
struct RowStats {
  double m = -std::numeric_limits<double>::infinity();
  double s = 0;
  double t = 0;
  double zt = 0;
};

// Folds one tile row into `st`; returns alpha = exp(m_old - m_new), the factor by which sums
// taken relative to the old max shrink. With `store`, the row is overwritten by exp(z - m_new)
// (the eager-gradient forward multiplies those by the weight tile).
template <typename T>
double merge_tile_row(RowStats& st, T* z, int64_t cols, int64_t v0, int64_t target, bool with_entropy, bool store) {
  if (target >= v0 && target < v0 + cols) st.zt = z[target - v0];  // before `store` overwrites it
  const double tile_max = sgsd::row_max(z, cols);
  const double m_new = tile_max > st.m ? tile_max : st.m;
  double s_tile = 0, t_tile = 0;
  if (store)
    sgsd::exp_sums_store(z, cols, static_cast<T>(m_new), &s_tile, with_entropy ? &t_tile : nullptr);
  else
    sgsd::exp_sums(z, cols, static_cast<T>(m_new), &s_tile, with_entropy ? &t_tile : nullptr);
  double alpha = 0;
  if (st.s > 0) {
    // Re-express the old statistics relative to m_new: (z - m_new) = (z - m) + (m - m_new).
    const double shift = st.m - m_new;
    alpha = std::exp(shift);
    st.t = alpha * (st.t + shift * st.s) + t_tile;
    st.s = alpha * st.s + s_tile;
  } else {
    st.t = t_tile;
    st.s = s_tile;
  }
  st.m = m_new;
  return alpha;
}

// The forward; with `eager_dx` also dlogp/dX = (W[target] - sum_v p_v W_v) / temperature per row
// ([N, H], math dtype), accumulated tile by tile like the softmax sums: D <- alpha * D + exp(z -
// m_new) @ W_tile, divided by s at the end of the chunk. That is one GEMM more in the forward
// and none in the backward (dX = grad * dlogp/dX), instead of the backward's recompute + dX
// GEMMs: 2 GEMM units in all instead of 3, when the weight needs no gradient (LoRA).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double temperature,
    bool with_entropy, bool eager_dx, int64_t chunk_rows, int64_t vocab_tile) {
  check_inputs(hidden, weight, targets, temperature, chunk_rows, vocab_tile);
  const int64_t n = hidden.size(0), vocab = weight.size(0), dim = hidden.size(1);
  const at::ScalarType mt = math_dtype(hidden);
  const auto opts = hidden.options().dtype(mt);
  at::Tensor logp = at::zeros({n}, opts), lse = at::zeros({n}, opts), entropy = at::zeros({n}, opts);
  at::Tensor gx = eager_dx ? at::zeros({n, dim}, opts) : at::empty({0}, opts);
  if (n == 0) return {logp, lse, entropy, gx};
  const at::Tensor tgt = targets.contiguous();
  const int64_t* tgt_p = checked_targets(tgt, vocab);
  const int64_t rows_max = std::min(chunk_rows, n), tile_max = std::min(vocab_tile, vocab);
  at::Tensor block = at::empty({rows_max * tile_max}, opts);
  const double inv_temp = 1.0 / temperature;

  AT_DISPATCH_FLOATING_TYPES(mt, "linear_logprobs_fwd_cpu", [&] {
    std::vector<RowStats> stats(static_cast<size_t>(rows_max));
    at::Tensor alpha = at::empty({rows_max, 1}, opts);
    scalar_t* alpha_p = alpha.data_ptr<scalar_t>();
    scalar_t* logp_p = logp.data_ptr<scalar_t>();
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* ent_p = entropy.data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < n; r0 += rows_max) {
      const int64_t rows = std::min(rows_max, n - r0);
      const at::Tensor h = scaled_rows(hidden, r0, rows, mt, inv_temp);
      at::Tensor d = eager_dx ? gx.narrow(0, r0, rows) : gx;
      std::fill(stats.begin(), stats.begin() + rows, RowStats{});
      for (int64_t v0 = 0; v0 < vocab; v0 += tile_max) {
        const int64_t cols = std::min(tile_max, vocab - v0);
        const at::Tensor w = weight.narrow(0, v0, cols).to(mt);
        at::Tensor z = block.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(z, h, w.t());
        scalar_t* z_p = z.data_ptr<scalar_t>();
        at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i)
            alpha_p[i] = static_cast<scalar_t>(
                merge_tile_row(stats[i], z_p + i * cols, cols, v0, tgt_p[r0 + i], with_entropy, eager_dx));
        });
        if (eager_dx) {
          if (v0 > 0) d.mul_(alpha.narrow(0, 0, rows));
          d.addmm_(z, w);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const RowStats& st = stats[i];
        const double log_s = std::log(st.s);
        lse_p[r0 + i] = static_cast<scalar_t>(st.m + log_s);
        logp_p[r0 + i] = static_cast<scalar_t>((st.zt - st.m) - log_s);
        if (with_entropy) ent_p[r0 + i] = static_cast<scalar_t>(log_s - st.t / st.s);
        alpha_p[i] = static_cast<scalar_t>(1.0 / st.s);  // the alpha column now holds 1/s, for D / s
      }
      if (eager_dx) {
        // dlogp/dX = (W[target] - D / s) / temperature
        d.mul_(alpha.narrow(0, 0, rows)).neg_();
        d.add_(weight.index_select(0, tgt.narrow(0, r0, rows)).to(mt)).mul_(inv_temp);
      }
    }
  });
  return {logp, lse, entropy, gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double temperature,
    bool with_entropy, int64_t chunk_rows, int64_t vocab_tile) {
  auto [logp, lse, entropy, gx] =
      forward_impl(hidden, weight, targets, temperature, with_entropy, false, chunk_rows, vocab_tile);
  return {logp, lse, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_dx_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double temperature,
    bool with_entropy, int64_t chunk_rows, int64_t vocab_tile) {
  return forward_impl(hidden, weight, targets, temperature, with_entropy, true, chunk_rows, vocab_tile);
}

// dz = grad * (onehot(target) - softmax(z)) / temperature is formed block by block and consumed
// right away: dX[chunk] += dz @ W[tile] and dW[tile] += dz^T @ X[chunk], both accumulated in the
// math dtype (fp32 for half inputs) and cast to the input dtype once at the end.
std::tuple<at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& grad_logp,
    const at::Tensor& lse, double temperature, bool compute_dx, bool compute_dw, int64_t chunk_rows,
    int64_t vocab_tile) {
  check_inputs(hidden, weight, targets, temperature, chunk_rows, vocab_tile);
  const int64_t n = hidden.size(0), vocab = weight.size(0), dim = hidden.size(1);
  const at::ScalarType mt = math_dtype(hidden);
  const auto opts = hidden.options().dtype(mt);
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == n && lse.dim() == 1 && lse.size(0) == n,
              "linear_logprobs (cpu): grad_logp and lse must have shape [N]");
  at::Tensor dx = compute_dx ? at::zeros({n, dim}, opts) : at::empty({0}, opts);
  at::Tensor dw = compute_dw ? at::zeros({vocab, dim}, opts) : at::empty({0}, opts);
  if (n > 0 && (compute_dx || compute_dw)) {
    const double inv_temp = 1.0 / temperature;
    const at::Tensor tgt = targets.contiguous();
    const at::Tensor g = grad_logp.to(mt).contiguous(), l = lse.to(mt).contiguous();
    const int64_t* tgt_p = checked_targets(tgt, vocab);
    const int64_t rows_max = std::min(chunk_rows, n), tile_max = std::min(vocab_tile, vocab);
    at::Tensor block = at::empty({rows_max * tile_max}, opts);
    AT_DISPATCH_FLOATING_TYPES(mt, "linear_logprobs_bwd_cpu", [&] {
      const scalar_t* g_p = g.data_ptr<scalar_t>();
      const scalar_t* l_p = l.data_ptr<scalar_t>();
      for (int64_t r0 = 0; r0 < n; r0 += rows_max) {
        const int64_t rows = std::min(rows_max, n - r0);
        // h holds X / temperature, so dz without the 1/temperature factor times h is exactly dW.
        const at::Tensor h = scaled_rows(hidden, r0, rows, mt, inv_temp);
        for (int64_t v0 = 0; v0 < vocab; v0 += tile_max) {
          const int64_t cols = std::min(tile_max, vocab - v0);
          const at::Tensor w = weight.narrow(0, v0, cols).to(mt);
          at::Tensor z = block.narrow(0, 0, rows * cols).view({rows, cols});
          at::mm_out(z, h, w.t());
          scalar_t* z_p = z.data_ptr<scalar_t>();
          at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) {
              scalar_t* row = z_p + i * cols;
              const scalar_t gi = g_p[r0 + i];
              sgsd::scaled_exp(row, cols, l_p[r0 + i], -gi, row);
              const int64_t t = tgt_p[r0 + i] - v0;
              if (t >= 0 && t < cols) row[t] += gi;
            }
          });
          if (compute_dx) dx.narrow(0, r0, rows).addmm_(z, w, 1.0, inv_temp);
          if (compute_dw) dw.narrow(0, v0, cols).addmm_(z.t(), h);
        }
      }
    });
  }
  return {dx.to(hidden.scalar_type()), dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgsd_fast, m) {
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor targets, float temperature, bool with_entropy, "
      "int chunk_rows, int vocab_tile) -> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def(
      "linear_logprobs_fwd_dx(Tensor hidden, Tensor weight, Tensor targets, float temperature, bool with_entropy, "
      "int chunk_rows, int vocab_tile) -> (Tensor logp, Tensor lse, Tensor entropy, Tensor dlogp_dx)");
  m.def(
      "linear_logprobs_bwd(Tensor hidden, Tensor weight, Tensor targets, Tensor grad_logp, Tensor lse, "
      "float temperature, bool compute_dx, bool compute_dw, int chunk_rows, int vocab_tile) -> (Tensor dx, Tensor dw)");
}

TORCH_LIBRARY_IMPL(sgsd_fast, CPU, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd_cpu);
  m.impl("linear_logprobs_fwd_dx", &linear_logprobs_fwd_dx_cpu);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd_cpu);
}
