// CPU implementation of fixnorm_ext::fixnorm_step.
//
// The step is memory bound: SGD with momentum moves 5 values per element
// (read p, g, buf; write p, buf). Renormalising needs the norm of the
// *updated* weights, so each norm-controlled tensor is touched twice: pass 1
// updates and accumulates per-segment sums of squares, pass 2 rescales. To
// keep pass 2 out of DRAM, tensors are processed in buckets of about
// kBucketElems elements, pass 1 then pass 2 per bucket, so that pass 2 finds
// the bucket's weights still in cache; it takes the last-updated items first.
// A tensor larger than a bucket is a bucket of its own, and its pass 2 reads
// back from wherever the caches left it.
//
// float16 / bfloat16 tensors keep their updated weights in float32 in a
// scratch buffer between the passes, so they are rounded to storage once.
// float32 with a running momentum buffer goes through a hand-written AVX2
// loop (where the CPU has it) that streams the buffer past the caches.
//
// Determinism: work is cut into fixed items (independent of the thread
// count); each item writes its own partial sum, and segment norms add the
// partials in a fixed order. Same inputs, same bits, for any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "../fixnorm_meta.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#endif

namespace fixnorm_ext {
namespace {

constexpr int64_t kItemElems = int64_t(1) << 15;  // elements per work item (claimed by one thread)
constexpr int64_t kBucketElems = int64_t(1) << 18;  // elements per cache bucket
constexpr int64_t kParallelElems = int64_t(1) << 15;  // smaller steps run on the calling thread
constexpr int64_t kScratchMaxElems = int64_t(1) << 24;  // larger tensors rescale in place
constexpr int kLanes = 16;                     // independent accumulators (vectorisable)
constexpr int64_t kBlockElems = 256;           // squares summed in float32 per block, blocks in float64

// The hot loops are compiled twice, for x86-64-v3 (AVX2, FMA, F16C) and for
// the baseline, and the loader picks one for the running CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FIXNORM_HOT_LOOP __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FIXNORM_HOT_LOOP
#endif
#if defined(__GNUC__)
#define FIXNORM_INLINE __attribute__((always_inline)) inline
#else
#define FIXNORM_INLINE inline
#endif

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// float16 <-> float32 in plain integer and float operations without
// branches, so that loops over float16 vectorise (c10::Half's own conversion
// does not, without F16C in the baseline build).
FIXNORM_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  const float normal = c10::bit_cast<float>((em << 13) + 0x38000000u);  // rebias the exponent by 127 - 15
  const float subnormal = static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f;
  const float special = c10::bit_cast<float>((em << 13) | 0x7f800000u);  // inf and nan keep their payload
  const float mag = em < 0x0400u ? subnormal : (em >= 0x7c00u ? special : normal);
  return c10::bit_cast<float>(c10::bit_cast<uint32_t>(mag) | sign);
}

// Rounds to nearest, ties to even, like c10::Half.
FIXNORM_INLINE uint16_t float_to_half(float f) {
  const uint32_t x = c10::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  // Normal results: rebias by 15 - 127 and round away the 13 low mantissa
  // bits (adding 0xfff plus the lowest kept bit rounds ties to even); a carry
  // into the exponent is the right result, up to infinity.
  const uint32_t normal = std::min<uint32_t>((a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13, 0x7c00u);
  // Below 2^-14 the result is a multiple of 2^-24: adding 0.5 makes the FPU
  // round to exactly that grid, and the low bits are the subnormal's bits.
  const uint32_t subnormal = c10::bit_cast<uint32_t>(c10::bit_cast<float>(a) + 0.5f) - 0x3f000000u;
  const uint32_t mag = a > 0x7f800000u ? 0x7e00u : (a < 0x38800000u ? subnormal : normal);
  return static_cast<uint16_t>(mag | sign);
}

template <typename acc, typename T>
FIXNORM_INLINE acc load(T v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return half_to_float(v.x);
  } else {
    return static_cast<acc>(v);
  }
}

template <typename T, typename acc>
FIXNORM_INLINE T store(acc v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(float_to_half(v), c10::Half::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

template <typename acc>
struct Coeffs {
  acc lr, momentum, one_minus_dampening, weight_decay, grad_scale, sign;
  bool unscale;  // divide gradients by grad_scale
};

// The update of one element (steps 1-4); returns the new weight in the
// accumulation type so its square is taken before rounding to storage.
template <typename scalar_t, typename out_t, int kMomentum, bool kNesterov, bool kDecay>
FIXNORM_INLINE acc_t<scalar_t> update_one(const scalar_t* p, const scalar_t* g, scalar_t* buf, out_t* out, int64_t i,
                                          const Coeffs<acc_t<scalar_t>>& c, bool unscale, acc_t<scalar_t>& old) {
  using acc = acc_t<scalar_t>;
  const acc pv = load<acc>(p[i]);
  old = pv;
  acc gv = load<acc>(g[i]);
  if (unscale) gv = gv / c.grad_scale;  // loop invariant: the compiler hoists the test
  gv = gv * c.sign;
  if constexpr (kDecay) gv = gv + c.weight_decay * pv;
  acc d = gv;
  if constexpr (kMomentum != 0) {
    const acc b = kMomentum == 1 ? gv : c.momentum * load<acc>(buf[i]) + c.one_minus_dampening * gv;
    buf[i] = store<scalar_t>(b);
    d = kNesterov ? gv + c.momentum * b : b;
  }
  const acc np = pv - c.lr * d;
  out[i] = store<out_t>(np);
  return np;
}

// What pass 1 sums over a range (see kSumCols): nothing, the new weights'
// squares (kNormSums), or those and the three sums the angle needs (kAllSums).
constexpr int kNoSums = 0, kNormSums = 1, kAllSums = 4;
// Columns of the optional `sums` output, one row per segment: the updated
// (not yet rescaled) weights' sum of squares, the old weights' sum of
// squares, <w_old, delta> and ||delta||^2, delta being the update.
enum SumCol : int { kNewSq = 0, kOldSq = 1, kOldDotDelta = 2, kDeltaSq = 3, kSumCols = 4 };

// Adds one element's terms to lane j of the sums kSums asks for.
template <int kSums, typename acc>
FIXNORM_INLINE void add_sums(acc (*lanes)[kLanes], int j, acc old, acc now) {
  if constexpr (kSums >= kNormSums) lanes[kNewSq][j] += now * now;
  if constexpr (kSums == kAllSums) {
    const acc d = now - old;  // exact whenever the step is smaller than the weight (Sterbenz)
    lanes[kOldSq][j] += old * old;
    lanes[kOldDotDelta][j] += old * d;
    lanes[kDeltaSq][j] += d * d;
  }
}

// Update [0, n), writing the new weights to `out` (the parameter itself, or
// scratch), and add the kSums sums of the range to sums[0, kSums). Each sum
// is added in kLanes independent lanes (so the compiler can vectorise without
// reassociating) of the accumulation type within blocks of kBlockElems, and
// the blocks in float64: rounding error stays at a few float32 ulps however
// long the tensor, and fixed norms do not drift from their target.
template <typename scalar_t, typename out_t, int kMomentum, bool kNesterov, bool kDecay, int kSums>
FIXNORM_HOT_LOOP void update_range(const scalar_t* p, const scalar_t* g, scalar_t* buf, out_t* out, int64_t n,
                                   const Coeffs<acc_t<scalar_t>>& c, bool unscale, double* sums) {
  using acc = acc_t<scalar_t>;
  constexpr int kCols = kSums > 0 ? kSums : 1;
  double total[kCols][kLanes] = {};
  for (int64_t start = 0; start < n; start += kBlockElems) {
    const int64_t stop = std::min(n, start + kBlockElems);
    acc lanes[kCols][kLanes] = {};
    int64_t i = start;
    acc old;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc v =
            update_one<scalar_t, out_t, kMomentum, kNesterov, kDecay>(p, g, buf, out, i + j, c, unscale, old);
        add_sums<kSums>(lanes, j, old, v);
      }
    }
    for (int j = 0; i < stop; ++i, ++j) {
      const acc v = update_one<scalar_t, out_t, kMomentum, kNesterov, kDecay>(p, g, buf, out, i, c, unscale, old);
      add_sums<kSums>(lanes, j, old, v);
    }
    for (int k = 0; k < kSums; ++k) {
      for (int j = 0; j < kLanes; ++j) total[k][j] += lanes[k][j];
    }
  }
  for (int k = 0; k < kSums; ++k) {
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int j = 0; j < width; ++j) total[k][j] += total[k][j + width];
    }
    sums[k] += total[k][0];
  }
}

// p = src * factor, src being scratch (acc_t) or p itself.
template <typename scalar_t, typename src_t>
FIXNORM_HOT_LOOP void scale_range(scalar_t* p, const src_t* src, int64_t n, acc_t<scalar_t> factor) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) p[i] = store<scalar_t>(load<acc>(src[i]) * factor);
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FIXNORM_AVX2_PATH 1
// float32 with a running momentum buffer, in place: the most common case, in
// AVX2 by hand so that the buffer can be written with non-temporal stores.
// They keep the buffer (not read again this step) from pushing the freshly
// updated weights out of cache before pass 2 reads them back. Handles
// n - n % 16 elements; `buf` must be 32-byte aligned.
// With kStats, also sums the three terms of the angle (see SumCol), in
// float32 blocks as the squares, and adds all four sums to sums[0..3];
// otherwise adds the squares to sums[0].
template <bool kStats>
__attribute__((target("avx2,fma"))) void update_f32_avx2(float* p, const float* g, float* buf, int64_t n,
                                                        const Coeffs<float>& c, bool nesterov, bool decay,
                                                        double* sums) {
  const __m256 lr = _mm256_set1_ps(c.lr), mu = _mm256_set1_ps(c.momentum);
  const __m256 omd = _mm256_set1_ps(c.one_minus_dampening), wd = _mm256_set1_ps(c.weight_decay);
  const __m256 sign = _mm256_set1_ps(c.sign), scale = _mm256_set1_ps(c.grad_scale);
  __m256d total = _mm256_setzero_pd();
  // The angle's sums across blocks: [column - 1][low / high four lanes].
  __m256d stat[3][2];
  for (auto& col : stat) col[0] = col[1] = _mm256_setzero_pd();
  const int64_t full = n - n % 16;
  for (int64_t start = 0; start < full; start += kBlockElems) {
    const int64_t stop = std::min(full, start + kBlockElems);
    __m256 lanes[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 slanes[3][2];
    for (auto& col : slanes) col[0] = col[1] = _mm256_setzero_ps();
    for (int64_t i = start; i < stop; i += 16) {
      for (int h = 0; h < 2; ++h) {
        const int64_t k = i + 8 * h;
        const __m256 pv = _mm256_loadu_ps(p + k);
        __m256 gv = _mm256_loadu_ps(g + k);
        if (c.unscale) gv = _mm256_div_ps(gv, scale);
        gv = _mm256_mul_ps(gv, sign);
        if (decay) gv = _mm256_add_ps(gv, _mm256_mul_ps(wd, pv));
        const __m256 b = _mm256_add_ps(_mm256_mul_ps(mu, _mm256_load_ps(buf + k)), _mm256_mul_ps(omd, gv));
        _mm256_stream_ps(buf + k, b);
        const __m256 d = nesterov ? _mm256_add_ps(gv, _mm256_mul_ps(mu, b)) : b;
        const __m256 np = _mm256_sub_ps(pv, _mm256_mul_ps(lr, d));
        _mm256_storeu_ps(p + k, np);
        lanes[h] = _mm256_add_ps(lanes[h], _mm256_mul_ps(np, np));
        if constexpr (kStats) {
          const __m256 dv = _mm256_sub_ps(np, pv);
          slanes[0][h] = _mm256_add_ps(slanes[0][h], _mm256_mul_ps(pv, pv));
          slanes[1][h] = _mm256_add_ps(slanes[1][h], _mm256_mul_ps(pv, dv));
          slanes[2][h] = _mm256_add_ps(slanes[2][h], _mm256_mul_ps(dv, dv));
        }
      }
    }
    const __m256 block = _mm256_add_ps(lanes[0], lanes[1]);
    total = _mm256_add_pd(total, _mm256_cvtps_pd(_mm256_castps256_ps128(block)));
    total = _mm256_add_pd(total, _mm256_cvtps_pd(_mm256_extractf128_ps(block, 1)));
    if constexpr (kStats) {
      for (int col = 0; col < 3; ++col) {
        const __m256 sb = _mm256_add_ps(slanes[col][0], slanes[col][1]);
        stat[col][0] = _mm256_add_pd(stat[col][0], _mm256_cvtps_pd(_mm256_castps256_ps128(sb)));
        stat[col][1] = _mm256_add_pd(stat[col][1], _mm256_cvtps_pd(_mm256_extractf128_ps(sb, 1)));
      }
    }
  }
  _mm_sfence();  // streamed stores are weakly ordered: publish them before the item counts as done
  alignas(32) double t[4];
  _mm256_store_pd(t, total);
  sums[kNewSq] += (t[0] + t[1]) + (t[2] + t[3]);
  if constexpr (kStats) {
    for (int col = 0; col < 3; ++col) {
      _mm256_store_pd(t, _mm256_add_pd(stat[col][0], stat[col][1]));
      sums[kOldSq + col] += (t[0] + t[1]) + (t[2] + t[3]);
    }
  }
}
// FIXNORM_CPU_GENERIC=1 turns the hand-written path off, so that tests can
// check the generic loops on a machine that has AVX2.
const bool kHasAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) &&
                      std::getenv("FIXNORM_CPU_GENERIC") == nullptr;
#endif

// Per-tensor plan. Segments are the whole tensor or each dim-0 slice; a
// segment longer than kItemElems is cut into pieces, and each piece owns one
// partial sum (slot).
struct TensorPlan {
  void* p;
  const void* g;
  void* buf;
  int64_t seg_len;         // elements per segment
  int64_t pieces_per_seg;  // slots per segment
  int64_t slot_offset;     // first slot of this tensor
  int64_t mode;
  const double* target;    // one target per segment (mode != kNone)
  int64_t group;
  int kind;                // update kernel variant, see kind_of()
  at::ScalarType dtype;
  int64_t scratch_offset;  // byte offset of the tensor's scratch in its bucket, -1: in place
};

struct Item {
  int64_t tensor, begin, end;  // element range [begin, end) of one tensor
};

// Items never cross a segment boundary unless they hold whole segments.
void add_items(const TensorPlan& t, int64_t tensor, int64_t numel, std::vector<Item>& items) {
  if (t.seg_len <= kItemElems) {
    const int64_t per_item = std::max<int64_t>(1, kItemElems / t.seg_len) * t.seg_len;
    for (int64_t b = 0; b < numel; b += per_item) items.push_back({tensor, b, std::min(numel, b + per_item)});
    return;
  }
  for (int64_t s = 0; s < numel; s += t.seg_len) {
    for (int64_t b = s; b < s + t.seg_len; b += kItemElems) {
      items.push_back({tensor, b, std::min(s + t.seg_len, b + kItemElems)});
    }
  }
}

template <typename scalar_t>
Coeffs<acc_t<scalar_t>> coeffs_of(const double* h, const std::optional<double>& grad_scale) {
  using acc = acc_t<scalar_t>;
  return {static_cast<acc>(h[kLr]), static_cast<acc>(h[kMomentum]),
          static_cast<acc>(1.0 - h[kDampening]), static_cast<acc>(h[kWeightDecay]),
          static_cast<acc>(grad_scale.value_or(1.0)), static_cast<acc>(h[kMaximize] != 0 ? -1.0 : 1.0),
          grad_scale.has_value()};
}

// kind = momentum variant (0 none, 1 first step, 2 running) * 4 + nesterov * 2 + decay.
int kind_of(const double* h, bool init_buffer) {
  const int mom = h[kMomentum] == 0 ? 0 : (init_buffer ? 1 : 2);
  return mom * 4 + (h[kNesterov] != 0 ? 2 : 0) + (h[kWeightDecay] != 0 ? 1 : 0);
}

template <typename scalar_t, typename out_t, int kSums>
void update_dispatch(int kind, const scalar_t* p, const scalar_t* g, scalar_t* buf, out_t* out, int64_t n,
                     const Coeffs<acc_t<scalar_t>>& c, double* sums) {
  switch (kind) {
#define FIXNORM_KIND(K)                                                                                    \
  case K:                                                                                                  \
    return update_range<scalar_t, out_t, (K) / 4, ((K) & 2) != 0, ((K) & 1) != 0, kSums>(p, g, buf, out, n, c, \
                                                                                          c.unscale, sums);
    FIXNORM_KIND(0) FIXNORM_KIND(1) FIXNORM_KIND(2) FIXNORM_KIND(3)
    FIXNORM_KIND(4) FIXNORM_KIND(5) FIXNORM_KIND(6) FIXNORM_KIND(7)
    FIXNORM_KIND(8) FIXNORM_KIND(9) FIXNORM_KIND(10) FIXNORM_KIND(11)
#undef FIXNORM_KIND
  }
  TORCH_INTERNAL_ASSERT(false, "fixnorm_step: bad update kind ", kind);
}

// Pass 1 over one item: update, and report each overlapped segment piece's
// sums to its slot: slot k is slots[k * cols, (k + 1) * cols), cols being
// kSumCols with `stats` (every tensor reports all four sums) and 1 without
// (norm-controlled tensors report their squares).
template <typename scalar_t>
void update_item(const TensorPlan& t, const Item& it, const double* hparams, const std::optional<double>& grad_scale,
                 double* slots, char* scratch, bool stats) {
  const auto c = coeffs_of<scalar_t>(hparams + t.group * kHparamCols, grad_scale);
  auto* p = static_cast<scalar_t*>(t.p);
  auto* g = static_cast<const scalar_t*>(t.g);
  auto* buf = static_cast<scalar_t*>(t.buf);
  auto* out = t.scratch_offset < 0 ? nullptr : reinterpret_cast<acc_t<scalar_t>*>(scratch + t.scratch_offset);
  const int cols = stats ? kSumCols : 1;
  for (int64_t lo = it.begin; lo < it.end;) {
    const int64_t seg = lo / t.seg_len;
    const int64_t hi = std::min(it.end, (seg + 1) * t.seg_len);
    scalar_t* b = buf ? buf + lo : nullptr;
    double* slot = slots + cols * (t.slot_offset + seg * t.pieces_per_seg + (lo - seg * t.seg_len) / kItemElems);
    if (out) {
      using acc = acc_t<scalar_t>;
      if (stats) {
        update_dispatch<scalar_t, acc, kAllSums>(t.kind, p + lo, g + lo, b, out + lo, hi - lo, c, slot);
      } else {
        update_dispatch<scalar_t, acc, kNormSums>(t.kind, p + lo, g + lo, b, out + lo, hi - lo, c, slot);
      }
    } else {
      // In place. The float32 AVX2 path takes norm-controlled and plain
      // tensors alike, so switching norm control on or off never changes
      // the SGD arithmetic.
      int64_t done = 0;
#ifdef FIXNORM_AVX2_PATH
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (kHasAvx2 && t.kind / 4 == 2 && (reinterpret_cast<uintptr_t>(b) & 31) == 0) {
          done = (hi - lo) - (hi - lo) % 16;
          double unused = 0.0;  // a plain tensor's squares, not reported
          double* to = stats || t.mode != kNone ? slot : &unused;
          if (stats) {
            update_f32_avx2<true>(p + lo, g + lo, b, hi - lo, c, (t.kind & 2) != 0, (t.kind & 1) != 0, to);
          } else {
            update_f32_avx2<false>(p + lo, g + lo, b, hi - lo, c, (t.kind & 2) != 0, (t.kind & 1) != 0, to);
          }
        }
      }
#endif
      scalar_t* b_rest = b ? b + done : nullptr;
      scalar_t* rest = p + lo + done;
      const scalar_t* g_rest = g + lo + done;
      if (stats) {
        update_dispatch<scalar_t, scalar_t, kAllSums>(t.kind, rest, g_rest, b_rest, rest, hi - lo - done, c, slot);
      } else if (t.mode != kNone) {
        update_dispatch<scalar_t, scalar_t, kNormSums>(t.kind, rest, g_rest, b_rest, rest, hi - lo - done, c, slot);
      } else {
        update_dispatch<scalar_t, scalar_t, kNoSums>(t.kind, rest, g_rest, b_rest, rest, hi - lo - done, c, nullptr);
      }
    }
    lo = hi;
  }
}

// Pass 2 over one item: rescale each overlapped segment by its factor.
template <typename scalar_t>
void rescale_item(const TensorPlan& t, const Item& it, const double* slots, const char* scratch, int cols) {
  auto* p = static_cast<scalar_t*>(t.p);
  auto* src = t.scratch_offset < 0 ? nullptr
                                   : reinterpret_cast<const acc_t<scalar_t>*>(scratch + t.scratch_offset);
  for (int64_t lo = it.begin; lo < it.end;) {
    const int64_t seg = lo / t.seg_len;
    const int64_t hi = std::min(it.end, (seg + 1) * t.seg_len);
    double sumsq = 0.0;
    const double* s = slots + cols * (t.slot_offset + seg * t.pieces_per_seg);
    for (int64_t k = 0; k < t.pieces_per_seg; ++k) sumsq += s[k * cols];
    const double n = std::sqrt(sumsq);
    const double r = t.target[seg];
    // As the reference: r / n, clamped at 1 for "max" (a NaN norm stays NaN);
    // a segment with n == 0 is left alone. In place, a clamp that does not
    // bind costs no write.
    double factor = r / n;
    if (t.mode == kMax && factor > 1.0) factor = 1.0;
    if (n == 0.0) factor = 1.0;
    const auto f = static_cast<acc_t<scalar_t>>(factor);
    if (src) {
      scale_range<scalar_t>(p + lo, src + lo, hi - lo, f);
    } else if (factor != 1.0) {
      scale_range<scalar_t>(p + lo, p + lo, hi - lo, f);
    }
    lo = hi;
  }
}

// Claims and completions of one bucket's items, shared by the threads.
struct BucketProgress {
  std::atomic<int64_t> next_update{0};   // next pass-1 item to claim
  std::atomic<int64_t> updated{0};       // pass-1 items finished
  std::atomic<int64_t> next_rescale{0};  // next pass-2 item to claim
};

void run_step(const std::vector<TensorPlan>& plans, const std::vector<Item>& items,
              const std::vector<int64_t>& bucket_starts, const double* hparams, const std::optional<double>& grad_scale,
              std::vector<double>& slots, bool stats, int64_t scratch_bytes, int64_t total_elems) {
  const int cols = stats ? kSumCols : 1;
  // Reused across steps so its pages stay mapped and warm in cache.
  thread_local std::vector<char> scratch_store;
  if (static_cast<int64_t>(scratch_store.size()) < scratch_bytes) scratch_store.resize(scratch_bytes);
  char* scratch = scratch_store.data();
  auto pass1 = [&](const Item& it) {
    const TensorPlan& t = plans[it.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.dtype, "fixnorm_step_cpu", [&] {
      update_item<scalar_t>(t, it, hparams, grad_scale, slots.data(), scratch, stats);
    });
  };
  auto pass2 = [&](const Item& it) {
    const TensorPlan& t = plans[it.tensor];
    if (t.mode == kNone) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.dtype, "fixnorm_step_cpu", [&] {
      rescale_item<scalar_t>(t, it, slots.data(), scratch, cols);
    });
  };
  // One parallel region for the whole step. Threads claim items one at a
  // time; the only wait is before pass 2 of a bucket, for the last pass-1
  // item of that bucket (its norms must be complete). Any number of
  // participating threads works, so nesting or a smaller pool cannot deadlock,
  // and results do not depend on who did which item.
  const int64_t num_buckets = static_cast<int64_t>(bucket_starts.size()) - 1;
  std::unique_ptr<BucketProgress[]> progress(new BucketProgress[std::max<int64_t>(num_buckets, 1)]);
  auto count_of = [&](int64_t b) { return bucket_starts[b + 1] - bucket_starts[b]; };
  auto wait_updated = [&](int64_t b) {
    for (int spins = 0; progress[b].updated.load(std::memory_order_acquire) < count_of(b); ++spins) {
      if (spins > 64) std::this_thread::yield();
    }
  };
  // Claim and run one pass-2 item of bucket b; false when none is left.
  // Last updated first: those weights are the likeliest still in cache.
  std::atomic<int64_t> rescaled{0};  // pass-2 items finished, all buckets
  auto rescale_one = [&](int64_t b) {
    const int64_t i = progress[b].next_rescale.fetch_add(1, std::memory_order_relaxed);
    if (i >= count_of(b)) return false;
    pass2(items[bucket_starts[b] + count_of(b) - 1 - i]);
    rescaled.fetch_add(1, std::memory_order_release);
    return true;
  };
  auto work = [&]() {
    for (int64_t b = 0; b < num_buckets; ++b) {
      BucketProgress& pr = progress[b];
      // Every bucket reuses the same scratch: before writing it, wait until
      // every earlier bucket's pass 2 has read its part.
      if (scratch_bytes > 0) {
        for (int spins = 0; rescaled.load(std::memory_order_acquire) < bucket_starts[b]; ++spins) {
          if (spins > 64) std::this_thread::yield();
        }
      }
      for (int64_t i; (i = pr.next_update.fetch_add(1, std::memory_order_relaxed)) < count_of(b);) {
        pass1(items[bucket_starts[b] + i]);
        pr.updated.fetch_add(1, std::memory_order_release);
      }
      wait_updated(b);
      while (rescale_one(b)) {
      }
    }
  };
  // A small step is not worth waking the thread pool for.
  const int64_t threads = items.size() > 1 && total_elems >= kParallelElems ? at::get_num_threads() : 1;
  if (threads <= 1) {
    work();
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) work();
    });
  }
}

void fixnorm_step_cpu(at::TensorList params, at::TensorList grads,
                      at::TensorList momentum_buffers,
                      const at::Tensor& hparams, const at::Tensor& meta, const at::Tensor& targets,
                      at::TensorList plan, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums) {
  // Everything is checked before the first write, so a refused call changes nothing.
  const int64_t num_tensors = static_cast<int64_t>(params.size());
  const bool stats = sums.has_value();
  TORCH_CHECK(grads.size() == params.size(), "fixnorm_step: params and grads must have the same length (got ",
              params.size(), " and ", grads.size(), ")");
  TORCH_CHECK(plan.empty(), "fixnorm_step: the CPU kernel takes no plan (got ", plan.size(), " tensors)");
  TORCH_CHECK(hparams.device().is_cpu() && hparams.scalar_type() == at::kDouble && hparams.dim() == 2 &&
                  hparams.size(1) == kHparamCols && hparams.is_contiguous(),
              "fixnorm_step: hparams must be a contiguous CPU float64 tensor of shape [groups, ", kHparamCols, "]");
  TORCH_CHECK(meta.device().is_cpu() && meta.scalar_type() == at::kLong && meta.dim() == 2 &&
                  meta.size(0) == num_tensors && meta.size(1) == kMetaCols && meta.is_contiguous(),
              "fixnorm_step: meta must be a contiguous CPU int64 tensor of shape [", num_tensors, ", ", kMetaCols, "]");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kDouble && targets.dim() == 1 &&
                  targets.is_contiguous(),
              "fixnorm_step: targets must be a contiguous 1-D CPU float64 tensor");
  for (const auto* opt : {&grad_scale, &found_inf}) {
    TORCH_CHECK(!opt->has_value() || ((*opt)->numel() == 1 && (*opt)->device().is_cpu()),
                "fixnorm_step: grad_scale and found_inf must be one-element CPU tensors");
  }
  const int64_t num_groups = hparams.size(0);
  const double* h = hparams.data_ptr<double>();
  const int64_t* m = meta.data_ptr<int64_t>();
  std::vector<TensorPlan> plans(num_tensors);
  std::vector<Item> items;
  std::vector<int64_t> bucket_starts{0};
  std::vector<bool> buffer_used(momentum_buffers.size(), false);
  int64_t num_slots = 0, bucket_elems = 0, bucket_scratch = 0, scratch_bytes = 0, total_elems = 0;
  int64_t num_rows = 0;  // of `sums`: one per segment, every tensor's segments in order
  std::vector<int64_t> first_row(num_tensors);
  for (int64_t i = 0; i < num_tensors; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const int64_t* row = m + i * kMetaCols;
    TORCH_CHECK(p.device().is_cpu() && g.device().is_cpu(), "fixnorm_step: tensor ", i, " is not on the CPU");
    const at::ScalarType dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                "fixnorm_step: unsupported dtype ", dtype, " (float32, float64, bfloat16, float16)");
    TORCH_CHECK(!p.is_sparse() && !g.is_sparse(), "fixnorm_step: sparse tensors are not supported (tensor ", i, ")");
    TORCH_CHECK(g.scalar_type() == dtype && g.sizes() == p.sizes(), "fixnorm_step: grad ", i, " (", g.scalar_type(),
                g.sizes(), ") does not match its param (", dtype, p.sizes(), ")");
    // The kernel walks each tensor as one flat block of memory: any dense
    // layout works (channels_last too) as long as grad and buffer share it.
    TORCH_CHECK(p.is_non_overlapping_and_dense() && g.strides() == p.strides(), "fixnorm_step: tensor ", i,
                " is not dense, or its grad has other strides than the param");
    TORCH_CHECK(row[kGroup] >= 0 && row[kGroup] < num_groups, "fixnorm_step: tensor ", i, " names group ",
                row[kGroup], " of ", num_groups);
    TORCH_CHECK(row[kMode] >= kNone && row[kMode] <= kMax, "fixnorm_step: tensor ", i, " has unknown mode ", row[kMode]);
    TORCH_CHECK(row[kNormDim] == -1 || row[kNormDim] == 0, "fixnorm_step: norm_dim must be -1 or 0 (tensor ", i, ")");
    const double* gh = h + row[kGroup] * kHparamCols;
    const int64_t bi = row[kBuffer];
    const bool has_buf = bi >= 0;
    TORCH_CHECK(has_buf == (gh[kMomentum] != 0), "fixnorm_step: tensor ", i,
                has_buf ? " has a momentum buffer but its group has no momentum" : " needs a momentum buffer");
    if (has_buf) {
      TORCH_CHECK(bi < static_cast<int64_t>(momentum_buffers.size()) && !buffer_used[bi], "fixnorm_step: tensor ", i,
                  " names momentum buffer ", bi, ", which is out of range or already taken");
      buffer_used[bi] = true;
      const at::Tensor& buf = momentum_buffers[bi];
      TORCH_CHECK(buf.device().is_cpu() && buf.scalar_type() == dtype && buf.sizes() == p.sizes() &&
                      buf.strides() == p.strides(),
                  "fixnorm_step: momentum buffer ", bi, " must be a CPU tensor with the dtype, shape and strides of param ", i);
    }
    const int64_t numel = p.numel();
    const bool rows = row[kNormDim] == 0 && p.dim() > 0;
    const int64_t segs = rows ? p.size(0) : 1;
    TORCH_CHECK(!rows || segs <= 1 || numel == 0 || p.stride(0) == numel / segs, "fixnorm_step: tensor ", i,
                " has norm_dim=0 but its dim-0 slices are not contiguous blocks (stride ", p.stride(0), ")");
    first_row[i] = num_rows;
    num_rows += segs;
    TensorPlan& t = plans[i];
    t.p = p.data_ptr();
    t.g = g.data_ptr();
    t.buf = has_buf ? momentum_buffers[bi].data_ptr() : nullptr;
    t.seg_len = std::max<int64_t>(1, segs ? numel / segs : 1);
    t.pieces_per_seg = (t.seg_len + kItemElems - 1) / kItemElems;
    t.slot_offset = num_slots;
    t.mode = row[kMode];
    t.group = row[kGroup];
    t.kind = kind_of(gh, row[kInitBuffer] != 0);
    t.dtype = dtype;
    t.target = nullptr;
    if (t.mode != kNone) {
      TORCH_CHECK(row[kTargetOffset] >= 0 && row[kTargetOffset] + segs <= targets.numel(), "fixnorm_step: tensor ",
                  i, " has target offset ", row[kTargetOffset], " outside targets (", targets.numel(), " entries)");
      t.target = targets.data_ptr<double>() + row[kTargetOffset];
    }
    t.scratch_offset = -1;
    if (numel == 0) continue;
    if (t.mode != kNone && numel <= kScratchMaxElems && (dtype == at::kHalf || dtype == at::kBFloat16)) {
      // Scratch offsets are relative to the bucket, 64-byte aligned; the
      // parameter's own element index addresses it (scratch + offset)[i].
      const int64_t acc_size = dtype == at::kDouble ? 8 : 4;
      t.scratch_offset = bucket_scratch;
      bucket_scratch += (numel * acc_size + 63) / 64 * 64;
      scratch_bytes = std::max(scratch_bytes, bucket_scratch);
    }
    num_slots += segs * t.pieces_per_seg;
    add_items(t, i, numel, items);
    bucket_elems += numel;
    total_elems += numel;
    if (bucket_elems >= kBucketElems) {
      bucket_starts.push_back(static_cast<int64_t>(items.size()));
      bucket_elems = 0;
      bucket_scratch = 0;
    }
  }
  if (bucket_starts.back() != static_cast<int64_t>(items.size())) bucket_starts.push_back(static_cast<int64_t>(items.size()));

  double* out = nullptr;
  if (stats) {
    TORCH_CHECK(sums->device().is_cpu() && sums->scalar_type() == at::kDouble && sums->is_contiguous() &&
                    sums->dim() == 2 && sums->size(0) == num_rows && sums->size(1) == kSumCols,
                "fixnorm_step: sums must be a contiguous CPU float64 tensor of shape [", num_rows, ", ", kSumCols,
                "] (one row per segment), got ", sums->scalar_type(), sums->sizes());
    out = sums->data_ptr<double>();
    std::fill(out, out + num_rows * kSumCols, 0.0);
  }

  // A step skipped for an overflow leaves everything as it was (sums: zeros).
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;
  const std::optional<double> scale =
      grad_scale.has_value() ? std::optional<double>(grad_scale->item<double>()) : std::nullopt;
  const int cols = stats ? kSumCols : 1;
  std::vector<double> slots(num_slots * cols, 0.0);
  run_step(plans, items, bucket_starts, h, scale, slots, stats, scratch_bytes, total_elems);
  if (!stats) return;
  // Each segment's sums: its pieces added in order (deterministic).
  for (int64_t i = 0; i < num_tensors; ++i) {
    const TensorPlan& t = plans[i];
    if (params[i].numel() == 0) continue;  // no slots; its rows stay zero
    const int64_t segs = params[i].numel() / t.seg_len;
    for (int64_t seg = 0; seg < segs; ++seg) {
      double* row = out + (first_row[i] + seg) * kSumCols;
      const double* piece = slots.data() + kSumCols * (t.slot_offset + seg * t.pieces_per_seg);
      for (int64_t k = 0; k < t.pieces_per_seg; ++k) {
        for (int col = 0; col < kSumCols; ++col) row[col] += piece[k * kSumCols + col];
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fixnorm_ext, CPU, m) {
  m.impl("fixnorm_step", &fixnorm_step_cpu);
}

}  // namespace fixnorm_ext
