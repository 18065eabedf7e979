// The CPU loop: sigmoid cross entropy, its reduction and its gradients in one
// pass over the data, vectorized by ATen's at::vec and split over ATen's
// threads. The formulas are kernels/_math.py's `ce_terms` and
// `weighted_loss_and_grads` (no focal factor), term for term, so the limits
// (infinite logits, zero weights masking) come out as the Triton kernels'
// and the reference's. Built on first use by fused_sigxent/_cpu_loop.py,
// which passes `Args` and reads the returned sum.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// Dtype codes (fused_sigxent/_cpu_loop.py DTYPE_CODES).
enum : int32_t { F32 = 0, F64 = 1, BF16 = 2, F16 = 3, U8 = 4 };

// Elements per tile: the unit of a thread's work and of the reduction's
// partial sums, fixed so that the sum does not depend on the thread count.
constexpr int64_t TILE = 16384;

// log1p(e) for e in [0, 1] as 2 atanh(e / (2 + e)): kernels/_math.py's
// LOG1P_P0..P4 (tests/impl/test_cpu_loop.py checks they are the same).
constexpr float LOG1P_P0 = 2.0f, LOG1P_P1 = 0.66666314f, LOG1P_P2 = 0.4002491f, LOG1P_P3 = 0.27960604f,
                LOG1P_P4 = 0.28178334f;

struct Args {
  const void* x;         // logits, contiguous
  const void* z;         // labels, contiguous (bool read as uint8)
  const void* w;         // weight or null, strided over `sizes`
  const void* p;         // pos_weight or null, strided over `sizes`
  const void* incoming;  // elementwise incoming gradient (reduction none's backward), contiguous, or null
  void* loss;            // elementwise loss out, or null (its sum only)
  void* gx;              // gradient of the logits out (the logits' dtype), or null
  void* gz;              // gradient of the labels out (the labels' dtype), or null
  int64_t sizes[4];      // the logits' shape collapsed to four dimensions (fused_sigxent/core/layout.py collapse)
  int64_t w_strides[4];
  int64_t p_strides[4];
  int64_t n;
  double smoothing;
  double scale;  // chain-rule factor: the incoming gradient over the denominator
  int32_t x_dtype, z_dtype, w_dtype, p_dtype, incoming_dtype, loss_dtype;
  int32_t want_loss;     // compute the loss (its elements into `loss` if given, its sum returned)
};

template <typename CT>
constexpr int32_t code() {
  return std::is_same_v<CT, double> ? F64 : F32;
}

// Elements k * stride, k < count, of a tensor of dtype `dtype`, converted to
// CT (c10's conversions): the paths at::vec does not cover (strided or
// broadcast coefficients, float64 math on narrower inputs).
template <typename CT, typename T>
inline void gather(CT* buf, const T* src, int64_t stride, int64_t count) {
  for (int64_t k = 0; k < count; ++k) buf[k] = static_cast<CT>(src[k * stride]);
}

template <typename CT>
inline void gather(CT* buf, const void* src, int32_t dtype, int64_t stride, int64_t count) {
  switch (dtype) {
    case F32: gather(buf, static_cast<const float*>(src), stride, count); break;
    case F64: gather(buf, static_cast<const double*>(src), stride, count); break;
    case BF16: gather(buf, static_cast<const c10::BFloat16*>(src), stride, count); break;
    case F16: gather(buf, static_cast<const c10::Half*>(src), stride, count); break;
    default: gather(buf, static_cast<const uint8_t*>(src), stride, count); break;
  }
}

// `count` elements of a tensor of dtype `dtype` from `src` (element stride
// `stride`), converted to CT; lanes past `count` are 0.
template <typename CT, bool FULL>
inline at::vec::Vectorized<CT> load(const void* src, int32_t dtype, int64_t stride, int64_t n) {
  using Vec = at::vec::Vectorized<CT>;
  // A constant count for whole vectors: the conversions below vectorize.
  const int64_t count = FULL ? Vec::size() : n;
  if (stride == 0) {
    CT value;
    gather(&value, src, dtype, 0, 1);
    return Vec(value);
  }
  if (dtype == code<CT>() && stride == 1) return Vec::loadu(src, count);
  if constexpr (std::is_same_v<CT, float>) {
    // Half-width vectors widened by at::vec's own conversions.
    if (dtype == BF16 && stride == 1) {
      return std::get<0>(at::vec::convert_to_float<c10::BFloat16>(at::vec::Vectorized<c10::BFloat16>::loadu(src, count)));
    }
    if (dtype == U8 && stride == 1) {
      auto bytes = at::vec::Vectorized<uint8_t>::loadu(src, count);
      return at::vec::convert<float>(at::vec::convert<int32_t>(bytes));
    }
    if (dtype == F16 && stride == 1) {
      return std::get<0>(at::vec::convert_to_float<c10::Half>(at::vec::Vectorized<c10::Half>::loadu(src, count)));
    }
  }
  alignas(64) CT buf[Vec::size()] = {};
  gather(buf, src, dtype, stride, count);
  return Vec::loadu(buf);
}

template <typename CT, typename T>
inline void scatter(T* dst, const CT* buf, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<T>(buf[k]);
}

// Stores `count` lanes of v, rounded once to `dtype`.
template <typename CT, bool FULL>
inline void store(void* dst, int32_t dtype, const at::vec::Vectorized<CT>& v, int64_t n) {
  const int64_t count = FULL ? at::vec::Vectorized<CT>::size() : n;
  if (dtype == code<CT>()) return v.store(dst, count);
  if constexpr (std::is_same_v<CT, float>) {
    // Rounded to nearest even (NaN kept) by at::vec, as c10's conversions do.
    if (dtype == BF16) return at::vec::convert_from_float<c10::BFloat16>(v, v).store(dst, count);
    if (dtype == F16) return at::vec::convert_from_float<c10::Half>(v, v).store(dst, count);
  }
  alignas(64) CT buf[at::vec::Vectorized<CT>::size()];
  v.store(buf);
  switch (dtype) {
    case F32: scatter(static_cast<float*>(dst), buf, count); break;
    case F64: scatter(static_cast<double*>(dst), buf, count); break;
    case BF16: scatter(static_cast<c10::BFloat16*>(dst), buf, count); break;
    case F16: scatter(static_cast<c10::Half*>(dst), buf, count); break;
    default: break;
  }
}

inline int64_t element_size(int32_t dtype) {
  return dtype == F64 ? 8 : dtype == F32 ? 4 : dtype == U8 ? 1 : 2;
}

inline const void* at_offset(const void* base, int32_t dtype, int64_t offset) {
  return static_cast<const char*>(base) + offset * element_size(dtype);
}

inline void* at_offset(void* base, int32_t dtype, int64_t offset) {
  return static_cast<char*>(base) + offset * element_size(dtype);
}

// log(1 + e) for e in [0, 1]: float by _math.log1p_unit's polynomial, double by Sleef.
inline at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& e) {
  using Vec = at::vec::Vectorized<float>;
  Vec t = e / (Vec(2.0f) + e);
  Vec s = t * t;
  Vec poly = at::vec::fmadd(s, Vec(LOG1P_P4), Vec(LOG1P_P3));
  poly = at::vec::fmadd(s, poly, Vec(LOG1P_P2));
  poly = at::vec::fmadd(s, poly, Vec(LOG1P_P1));
  poly = at::vec::fmadd(s, poly, Vec(LOG1P_P0));
  return t * poly;
}

inline at::vec::Vectorized<double> log1p_unit(const at::vec::Vectorized<double>& e) { return e.log1p(); }

// a * b, 0 where a is 0 (a zero weight masks an infinite or NaN term): _math.mul0.
template <typename Vec>
inline Vec mul0(const Vec& a, const Vec& b) {
  return Vec::blendv(a * b, Vec(0), a == Vec(0));
}

// One block of `count` (<= a vector) elements at flat offset i, whose
// coefficients start at w_row / p_row with inner strides w_s / p_s. Returns
// the weighted loss of the block's lanes (0 past count, and 0 when the loss
// is not asked).
template <typename CT, bool FULL>
inline at::vec::Vectorized<CT> block(const Args& a, int64_t i, int64_t count, const void* w_row, int64_t w_s,
                                     const void* p_row, int64_t p_s) {
  using Vec = at::vec::Vectorized<CT>;
  const Vec zero(0), one(1);
  Vec x = load<CT, FULL>(at_offset(a.x, a.x_dtype, i), a.x_dtype, 1, count);
  Vec z = load<CT, FULL>(at_offset(a.z, a.z_dtype, i), a.z_dtype, 1, count);
  if (a.smoothing != 0) z = z * Vec(CT(1 - a.smoothing)) + Vec(CT(0.5 * a.smoothing));
  // _math.ce_terms: one exp serves both sigmoids and the log term (taken
  // only where the loss or a pos_weight's labels gradient needs it: a
  // backward of the logits needs none).
  const bool has_p = p_row != nullptr, has_w = w_row != nullptr;
  const bool want_loss = a.want_loss != 0, need_log = want_loss || (a.gz != nullptr && has_p);
  Vec e = x.abs().neg().exp();
  Vec log_term = need_log ? log1p_unit(e) : zero;
  Vec pos = x >= zero;
  Vec one_minus_z = one - z;
  Vec pz = z, pw, w;
  if (has_p) {
    pw = load<CT, FULL>(p_row, a.p_dtype, p_s, count);
    pz = pw * z;
  }
  if (has_w) w = load<CT, FULL>(w_row, a.w_dtype, w_s, count);
  Vec scale(CT(a.scale));
  if (a.incoming != nullptr) scale = load<CT, FULL>(at_offset(a.incoming, a.incoming_dtype, i), a.incoming_dtype, 1, count);
  if (a.gx != nullptr) {
    Vec d_logits = (one / (one + e)) * Vec::blendv(one_minus_z * e - pz, one_minus_z - pz * e, pos);
    if (has_w) d_logits = mul0(w, d_logits);
    store<CT, FULL>(at_offset(a.gx, a.x_dtype, i), a.x_dtype, d_logits * scale, count);
  }
  if (a.gz != nullptr) {
    Vec d_labels = zero - x;
    if (has_p) {
      Vec k = Vec::blendv(pw, one, pos);
      d_labels = Vec::blendv(zero - k * x, zero, k == zero) + (pw - one) * log_term;
    }
    if (has_w) d_labels = mul0(w, d_labels);
    store<CT, FULL>(at_offset(a.gz, a.z_dtype, i), a.z_dtype, d_labels * (Vec(CT(1 - a.smoothing)) * scale), count);
  }
  if (!want_loss) return zero;
  Vec q_log = has_p ? (one + (pw - one) * z) * log_term : log_term;
  Vec c = Vec::blendv(zero - pz, one_minus_z, pos);
  Vec loss = Vec::blendv(c * x + q_log, q_log, c == zero);
  if (has_w) loss = mul0(w, loss);
  if (a.loss != nullptr) store<CT, FULL>(at_offset(a.loss, a.loss_dtype, i), a.loss_dtype, loss, count);
  if (!FULL) loss = Vec::set(zero, loss, count);
  return loss;
}

// The sum of a vector's lanes, in double.
template <typename CT>
inline double lanes_sum(const at::vec::Vectorized<CT>& v) {
  alignas(64) CT buf[at::vec::Vectorized<CT>::size()];
  v.store(buf);
  double total = 0;
  for (int64_t k = 0; k < at::vec::Vectorized<CT>::size(); ++k) total += buf[k];
  return total;
}

// A coefficient's element at (r0, r1, r2, col) of the collapsed shape, or null (none).
inline const void* coefficient_at(const void* base, int32_t dtype, const int64_t* s, int64_t r0, int64_t r1,
                                  int64_t r2, int64_t col) {
  return base == nullptr ? nullptr : at_offset(base, dtype, r0 * s[0] + r1 * s[1] + r2 * s[2] + col * s[3]);
}

inline const void* advance(const void* p, int32_t dtype, int64_t offset) {
  return p == nullptr ? nullptr : at_offset(p, dtype, offset);
}

// Elements [begin, end): segments that stay within one row of the collapsed
// shape, so each coefficient's row offset is found once per segment.
template <typename CT>
double tile(const Args& a, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<CT>;
  constexpr int64_t V = Vec::size();
  // Lane sums are flushed to double every FLUSH vectors: float error stays
  // that of a short sum.
  constexpr int64_t FLUSH = 32;
  const int64_t d1 = a.sizes[1], d2 = a.sizes[2], d3 = a.sizes[3];
  double total = 0;
  int64_t i = begin;
  while (i < end) {
    const int64_t row = i / d3, col = i % d3;
    const int64_t len = std::min(d3 - col, end - i);
    const int64_t r0 = row / (d1 * d2), r1 = (row / d2) % d1, r2 = row % d2;
    const void* w_row = coefficient_at(a.w, a.w_dtype, a.w_strides, r0, r1, r2, col);
    const void* p_row = coefficient_at(a.p, a.p_dtype, a.p_strides, r0, r1, r2, col);
    const int64_t w_s = a.w_strides[3], p_s = a.p_strides[3];
    Vec acc(0);
    int64_t k = 0, pending = 0;
    for (; k + V <= len; k += V) {
      acc = acc + block<CT, true>(a, i + k, V, advance(w_row, a.w_dtype, k * w_s), w_s,
                                  advance(p_row, a.p_dtype, k * p_s), p_s);
      if (++pending == FLUSH) {
        total += lanes_sum(acc);
        acc = Vec(0);
        pending = 0;
      }
    }
    if (k < len) {
      acc = acc + block<CT, false>(a, i + k, len - k, advance(w_row, a.w_dtype, k * w_s), w_s,
                                   advance(p_row, a.p_dtype, k * p_s), p_s);
    }
    total += lanes_sum(acc);
    i += len;
  }
  return total;
}

template <typename CT>
double run(const Args& a) {
  const int64_t n_tiles = (a.n + TILE - 1) / TILE;
  std::vector<double> partial(n_tiles, 0.0);
  at::parallel_for(0, n_tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) partial[c] = tile<CT>(a, c * TILE, std::min(a.n, (c + 1) * TILE));
  });
  double total = 0;
  for (double t : partial) total += t;  // in tile order: the same for any thread count
  return total;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) double fused_sigxent_cpu_loop(const Args* a) {
  return a->x_dtype == F64 ? run<double>(*a) : run<float>(*a);
}

extern "C" __attribute__((visibility("default"))) int64_t fused_sigxent_cpu_loop_args_size() { return sizeof(Args); }
