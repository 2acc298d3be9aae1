// The CUDA implementation of fixnorm_ext::fixnorm_step (DESIGN.md section 2).
//
// One step of every tensor of every group, whatever their number, in a
// constant number of launches driven by the plan of fixnorm_meta.h (built
// once per parameter layout by dispatch.build_cuda_plan):
//
// * norm pass (tensors with norm control, per chunk): read p, g, buf, compute
//   the updated weights and write their sum of squares to a norm partial;
//   nothing else is written, so the apply pass can compute the same update
//   again from the same inputs, bit for bit, and round only once.
// * finalize (per tensor): sum each segment's partials in a fixed order and
//   turn the norm into a factor (fixed: r/n, max: min(1, r/n), n = 0: 1).
// * apply pass (every chunk): the update, times the factor, rounded once and
//   written with the momentum buffer.
//
// Two schedules run these. "phased": three launches (all norm passes, all
// finalizes, all apply passes): simple, but a controlled tensor is read twice
// from memory. "fused" (the default): one persistent launch whose blocks take
// work items in the plan's queue order; a tensor's apply passes come a little
// after its norm passes, so they find p, g and buf still in L2, and the block
// that finishes a tensor's last norm pass finalizes it. A block reaching an
// apply pass waits for its tensor's factors; it only ever waits for items
// handed out before its own, so no wait can close a cycle.
//
// Norms are deterministic: every partial is a fixed reduction tree of fixed
// element subsets, summed in a fixed order (no floating-point atomics).
// Nothing here synchronizes with the host: lr, grad_scale and found_inf may
// live on the device, so a step can be captured in a CUDA graph.

// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE and cuBLAS
// headers, which a minimal CUDA toolkit does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../fixnorm_meta.h"

namespace fixnorm_ext {
namespace {

// Two resident blocks per multiprocessor, so one block's memory traffic
// overlaps the other's claiming and reductions between items (128 registers,
// no spills on sm_90 per ptxas -v).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocksPerSm = 2;
// An apply pass waits for its tensor's factors at most this many polls
// (about 20 s) and then traps: a bug shows as an error, not a hung GPU.
constexpr long long kMaxPolls = 200000000LL;
// Tensor pointers and group hyperparameters travel inside the kernel
// argument (up to 32764 bytes from CUDA 12.1 on, compute capability 7.0+),
// so a step uploads nothing; larger steps put them in a device table.
constexpr int kInlineTensors = 1100;
constexpr int kInlineGroups = 32;

enum DTypeCode : uint8_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };
constexpr uint8_t kDTypeMask = 3;
constexpr uint8_t kFlagInit = 4;    // the momentum buffer is new: set it to the gradient
constexpr uint8_t kFlagBuffer = 8;  // the tensor has a momentum buffer

struct TensorPtrs {
  void* p;
  const void* g;
  void* b;
};

struct StepArgs {
  const int64_t* tensors;    // plan[0]
  const int64_t* chunks;     // plan[1]
  const int32_t* queue;      // plan[2]
  const int64_t* seg_slots;  // plan[3]
  const double* targets;
  const double* hparams_table;     // when !inline_hparams
  const TensorPtrs* ptrs_table;    // when !inline_ptrs
  const uint8_t* flags_table;      // when !inline_ptrs
  const float* grad_scale_ptr;     // nullptr: grad_scale_value (or no scaling)
  const float* found_inf_ptr;      // nullptr: no skip test on the device
  double* partials;
  double* factors;
  int32_t* counters;  // [0]: next queue item; [1 + t]: finished norm passes of tensor t (+1 once finalized)
  int64_t num_chunks;
  int64_t num_items;
  double grad_scale_value;
  int32_t has_grad_scale;
  int32_t inline_hparams;
  int32_t inline_ptrs;
  double hparams[kInlineGroups][kHparamCols];
  TensorPtrs ptrs[kInlineTensors];
  uint8_t flags[kInlineTensors];
};
static_assert(sizeof(StepArgs) <= 32764, "kernel argument too large");

// --- storage types ---------------------------------------------------------

struct F32 {
  using raw = float;
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
struct F64 {
  using raw = double;
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
struct BF16 {
  using raw = unsigned short;
  using acc = float;
  static __device__ __forceinline__ float load(unsigned short v) { return __uint_as_float(uint32_t(v) << 16); }
  static __device__ __forceinline__ unsigned short store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
struct F16 {
  using raw = unsigned short;
  using acc = float;
  static __device__ __forceinline__ float load(unsigned short v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ unsigned short store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

// Explicitly rounded arithmetic: the compiler may not contract or reorder
// it, so the norm pass and the apply pass compute the same bits.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// Loads and stores; kStream marks data used for the last time (evict first).
template <bool kStream, typename T>
__device__ __forceinline__ T load(const T* ptr) {
  if constexpr (kStream) {
    return __ldcs(ptr);
  } else {
    return *ptr;
  }
}
template <bool kStream, typename T>
__device__ __forceinline__ void store(T* ptr, T v) {
  if constexpr (kStream) {
    __stcs(ptr, v);
  } else {
    *ptr = v;
  }
}

// 16 bytes of one storage type.
template <typename raw>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(raw);
  raw e[kSize];
};
template <bool kStream, typename raw>
__device__ __forceinline__ Vec<raw> load_vec(const raw* ptr) {
  Vec<raw> v;
  *reinterpret_cast<uint4*>(&v) = load<kStream>(reinterpret_cast<const uint4*>(ptr));
  return v;
}
template <bool kStream, typename raw>
__device__ __forceinline__ void store_vec(raw* ptr, const Vec<raw>& v) {
  store<kStream>(reinterpret_cast<uint4*>(ptr), *reinterpret_cast<const uint4*>(&v));
}

// --- the update of one element (steps 1-4) -----------------------------------

template <typename acc>
struct Hyper {
  acc lr, momentum, one_minus_dampening, weight_decay, sign, grad_scale;
  bool nesterov, decay, unscale, has_buf, init;
};

// Returns the updated weight; `b` comes in as the old buffer value (ignored
// when init) and leaves as the new one.
template <typename acc>
__device__ __forceinline__ acc update(acc p, acc g, acc& b, const Hyper<acc>& h) {
  if (h.unscale) g = div_rn(g, h.grad_scale);
  g = mul_rn(g, h.sign);
  if (h.decay) g = fma_rn(h.weight_decay, p, g);
  acc d = g;
  if (h.has_buf) {
    b = h.init ? g : fma_rn(h.one_minus_dampening, g, mul_rn(h.momentum, b));
    d = h.nesterov ? fma_rn(h.momentum, b, g) : b;
  }
  return fma_rn(-h.lr, d, p);
}

// The update of `len` elements from `start`, by the whole block. The norm
// pass (kApply false) returns this thread's sum of squares of the updated
// weights and writes nothing; the apply pass writes p = update * factor and
// the buffer. Both walk the elements in the same order.
template <class D, bool kApply>
__device__ __forceinline__ typename D::acc run_block(const TensorPtrs& t, int64_t start, int64_t len,
                                                     const Hyper<typename D::acc>& h, typename D::acc factor) {
  using raw = typename D::raw;
  using acc = typename D::acc;
  constexpr int V = Vec<raw>::kSize;
  raw* p = static_cast<raw*>(t.p) + start;
  const raw* g = static_cast<const raw*>(t.g) + start;
  raw* b = h.has_buf ? static_cast<raw*>(t.b) + start : nullptr;
  const uintptr_t addresses =
      reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(b);
  const int64_t num_vec = addresses % 16 == 0 ? len / V : 0;
  const bool read_buf = h.has_buf && !h.init;
  acc ss = 0;
  for (int64_t v = threadIdx.x; v < num_vec; v += kThreads) {
    Vec<raw> pv = load_vec<kApply>(p + v * V);
    const Vec<raw> gv = load_vec<kApply>(g + v * V);
    Vec<raw> bv;
    if (read_buf) bv = load_vec<kApply>(b + v * V);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc bk = read_buf ? D::load(bv.e[k]) : acc(0);
      const acc x = update(D::load(pv.e[k]), D::load(gv.e[k]), bk, h);
      if constexpr (kApply) {
        pv.e[k] = D::store(mul_rn(x, factor));
        bv.e[k] = D::store(bk);
      } else {
        ss = fma_rn(x, x, ss);
      }
    }
    if constexpr (kApply) {
      store_vec<true>(p + v * V, pv);
      if (h.has_buf) store_vec<true>(b + v * V, bv);
    }
  }
  for (int64_t i = num_vec * V + threadIdx.x; i < len; i += kThreads) {
    acc bk = read_buf ? D::load(load<kApply>(b + i)) : acc(0);
    const acc x = update(D::load(load<kApply>(p + i)), D::load(load<kApply>(g + i)), bk, h);
    if constexpr (kApply) {
      store<true>(p + i, D::store(mul_rn(x, factor)));
      if (h.has_buf) store<true>(b + i, D::store(bk));
    } else {
      ss = fma_rn(x, x, ss);
    }
  }
  return ss;
}

// The same for `len` elements of one segment, by one warp.
template <class D, bool kApply>
__device__ __forceinline__ typename D::acc run_warp(const TensorPtrs& t, int64_t start, int64_t len,
                                                    const Hyper<typename D::acc>& h, typename D::acc factor) {
  using raw = typename D::raw;
  using acc = typename D::acc;
  raw* p = static_cast<raw*>(t.p) + start;
  const raw* g = static_cast<const raw*>(t.g) + start;
  raw* b = h.has_buf ? static_cast<raw*>(t.b) + start : nullptr;
  const bool read_buf = h.has_buf && !h.init;
  acc ss = 0;
  for (int64_t i = threadIdx.x % 32; i < len; i += 32) {
    acc bk = read_buf ? D::load(load<kApply>(b + i)) : acc(0);
    const acc x = update(D::load(load<kApply>(p + i)), D::load(load<kApply>(g + i)), bk, h);
    if constexpr (kApply) {
      store<true>(p + i, D::store(mul_rn(x, factor)));
      if (h.has_buf) store<true>(b + i, D::store(bk));
    } else {
      ss = fma_rn(x, x, ss);
    }
  }
  return ss;
}

template <typename acc>
__device__ __forceinline__ acc warp_sum(acc v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The block's sum in a fixed tree, valid in thread 0.
template <typename acc>
__device__ __forceinline__ double block_sum(acc v, double* shared) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = static_cast<double>(v);
  __syncthreads();
  double total = 0;
  if (warp == 0) total = warp_sum(lane < kWarps ? shared[lane] : 0.0);
  __syncthreads();
  return total;
}

__device__ __forceinline__ bool skip_step(const StepArgs& a) {
  return a.found_inf_ptr != nullptr && *a.found_inf_ptr != 0.0f;
}

__device__ __forceinline__ const double* group_hparams(const StepArgs& a, int64_t group) {
  return a.inline_hparams ? a.hparams[group] : a.hparams_table + group * kHparamCols;
}

__device__ __forceinline__ TensorPtrs tensor_ptrs(const StepArgs& a, int64_t t) {
  return a.inline_ptrs ? a.ptrs[t] : a.ptrs_table[t];
}

__device__ __forceinline__ uint8_t tensor_flags(const StepArgs& a, int64_t t) {
  return a.inline_ptrs ? a.flags[t] : a.flags_table[t];
}

template <typename acc>
__device__ __forceinline__ Hyper<acc> make_hyper(const StepArgs& a, int64_t group, uint8_t flags) {
  const double* hp = group_hparams(a, group);
  Hyper<acc> h;
  h.lr = static_cast<acc>(hp[kLr]);
  h.momentum = static_cast<acc>(hp[kMomentum]);
  h.one_minus_dampening = static_cast<acc>(1.0 - hp[kDampening]);
  h.weight_decay = static_cast<acc>(hp[kWeightDecay]);
  h.sign = hp[kMaximize] != 0 ? acc(-1) : acc(1);
  h.nesterov = hp[kNesterov] != 0;
  h.decay = hp[kWeightDecay] != 0;
  h.unscale = a.has_grad_scale != 0;
  h.grad_scale = static_cast<acc>(a.grad_scale_ptr != nullptr ? *a.grad_scale_ptr : a.grad_scale_value);
  h.has_buf = (flags & kFlagBuffer) != 0;
  h.init = (flags & kFlagInit) != 0;
  return h;
}

// One pass over chunk c: the norm pass writes its partials, the apply pass
// its elements.
template <class D, bool kApply>
__device__ void run_chunk(const StepArgs& a, int64_t c, double* shared) {
  using acc = typename D::acc;
  const int64_t* chunk = a.chunks + c * kChunkCols;
  const int64_t t = chunk[kChunkTensor];
  const int64_t* tensor = a.tensors + t * kTensorCols;
  const uint8_t flags = tensor_flags(a, t);
  const Hyper<acc> h = make_hyper<acc>(a, tensor[kTensorGroup], flags);
  const TensorPtrs ptrs = tensor_ptrs(a, t);
  const int64_t start = chunk[kChunkStart], len = chunk[kChunkLen], segs = chunk[kChunkSegs];
  const int64_t seg0 = chunk[kChunkSeg0], slot0 = chunk[kChunkSlot0];
  if (segs <= 1) {
    // No norm control (segs 0), or one segment or part of one.
    const acc factor = kApply && segs == 1 ? static_cast<acc>(__ldcg(a.factors + seg0)) : acc(1);
    const acc ss = run_block<D, kApply>(ptrs, start, len, h, factor);
    if constexpr (!kApply) {
      const double total = block_sum(ss, shared);
      if (threadIdx.x == 0) a.partials[slot0] = total;
    }
    return;
  }
  // Several whole segments: one warp per segment.
  const int64_t seg_len = len / segs;
  for (int64_t j = threadIdx.x / 32; j < segs; j += kWarps) {
    const acc factor = kApply ? static_cast<acc>(__ldcg(a.factors + seg0 + j)) : acc(1);
    const acc ss = run_warp<D, kApply>(ptrs, start + j * seg_len, seg_len, h, factor);
    if constexpr (!kApply) {
      const acc total = warp_sum(ss);
      if (threadIdx.x % 32 == 0) a.partials[slot0 + j] = static_cast<double>(total);
    }
  }
}

template <bool kApply>
__device__ void run_chunk_any(const StepArgs& a, int64_t c, double* shared) {
  const int64_t t = a.chunks[c * kChunkCols + kChunkTensor];
  switch (tensor_flags(a, t) & kDTypeMask) {
    case kF32: run_chunk<F32, kApply>(a, c, shared); break;
    case kF64: run_chunk<F64, kApply>(a, c, shared); break;
    case kBF16: run_chunk<BF16, kApply>(a, c, shared); break;
    default: run_chunk<F16, kApply>(a, c, shared); break;
  }
}

__device__ __forceinline__ double factor_of(double sum, double target, int64_t mode) {
  const double n = sqrt(sum);
  double factor = target / n;
  if (mode == kMax && factor > 1.0) factor = 1.0;  // a NaN norm stays NaN, as in the reference
  if (n == 0.0) factor = 1.0;                      // a zero segment is left as it is
  return factor;
}

// The factors of tensor t's segments from its norm partials (step 5), summed
// in a fixed order: by the whole block for a single segment (it may have
// many partials), else one warp per segment.
__device__ void finalize_tensor(const StepArgs& a, int64_t t, double* shared) {
  const int64_t* tensor = a.tensors + t * kTensorCols;
  const int64_t mode = tensor[kTensorMode], seg_begin = tensor[kSegBegin], segs = tensor[kNumSegs];
  if (segs == 1) {
    const int64_t lo = a.seg_slots[seg_begin], hi = a.seg_slots[seg_begin + 1];
    double sum = 0;
    for (int64_t k = lo + threadIdx.x; k < hi; k += kThreads) sum += __ldcg(a.partials + k);
    const double total = block_sum(sum, shared);
    if (threadIdx.x == 0) a.factors[seg_begin] = factor_of(total, a.targets[seg_begin], mode);
    return;
  }
  for (int64_t j = threadIdx.x / 32; j < segs; j += kWarps) {
    const int64_t s = seg_begin + j;
    const int64_t lo = a.seg_slots[s], hi = a.seg_slots[s + 1];
    double sum = 0;
    for (int64_t k = lo + threadIdx.x % 32; k < hi; k += 32) sum += __ldcg(a.partials + k);
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) a.factors[s] = factor_of(sum, a.targets[s], mode);
  }
}

// --- the phased schedule: three launches -------------------------------------

__global__ void __launch_bounds__(kThreads) fixnorm_norm_pass_kernel(const __grid_constant__ StepArgs a) {
  __shared__ double shared[kWarps];
  if (skip_step(a)) return;
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    if (a.chunks[c * kChunkCols + kChunkSegs] == 0) continue;  // no norm control
    run_chunk_any<false>(a, c, shared);
  }
}

__global__ void __launch_bounds__(kThreads) fixnorm_finalize_kernel(const __grid_constant__ StepArgs a,
                                                                    int64_t num_tensors) {
  __shared__ double shared[kWarps];
  if (skip_step(a)) return;
  for (int64_t t = blockIdx.x; t < num_tensors; t += gridDim.x) {
    if (a.tensors[t * kTensorCols + kTensorMode] != kNone) finalize_tensor(a, t, shared);
  }
}

__global__ void __launch_bounds__(kThreads) fixnorm_apply_pass_kernel(const __grid_constant__ StepArgs a) {
  __shared__ double shared[kWarps];
  if (skip_step(a)) return;
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) run_chunk_any<true>(a, c, shared);
}

// --- the fused schedule: one persistent launch -------------------------------

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) fixnorm_fused_kernel(const __grid_constant__ StepArgs a) {
  __shared__ double shared[kWarps];
  __shared__ int32_t next_item;
  __shared__ int32_t finalize;
  if (skip_step(a)) return;
  int32_t* const head = a.counters;
  int32_t* const done = a.counters + 1;
  if (threadIdx.x == 0) next_item = atomicAdd(head, 1);
  __syncthreads();
  int32_t item = next_item;
  while (item < a.num_items) {
    // Ask for the next item now, so the wait for the answer overlaps this one.
    int32_t ahead = 0;
    if (threadIdx.x == 0) ahead = atomicAdd(head, 1);
    const int32_t entry = a.queue[item];
    const int64_t c = entry >> 1;
    const int64_t t = a.chunks[c * kChunkCols + kChunkTensor];
    const int64_t* tensor = a.tensors + t * kTensorCols;
    const int32_t norm_chunks = static_cast<int32_t>(tensor[kChunkEnd] - tensor[kChunkBegin]);
    if ((entry & 1) == kNormPass) {
      run_chunk_any<false>(a, c, shared);
      // Each thread that wrote a partial makes it visible to the device
      // before the block counts the chunk as done.
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) finalize = atomicAdd(done + t, 1) == norm_chunks - 1;
      __syncthreads();
      if (finalize) {
        // The last norm pass of tensor t: every partial is visible.
        __threadfence();
        finalize_tensor(a, t, shared);
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(done + t, 1);  // norm_chunks + 1: the factors are ready
      }
    } else {
      if (tensor[kTensorMode] != kNone) {
        if (threadIdx.x == 0) {
          const volatile int32_t* flag = done + t;
          long long polls = 0;
          while (*flag != norm_chunks + 1) {
            __nanosleep(64);
            if (++polls > kMaxPolls) __trap();
          }
          __threadfence();
        }
        __syncthreads();
      }
      run_chunk_any<true>(a, c, shared);
    }
    __syncthreads();
    if (threadIdx.x == 0) next_item = ahead;
    __syncthreads();
    item = next_item;
  }
}

// --- host side ---------------------------------------------------------------

uint8_t dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "fixnorm_step: unsupported dtype ", dtype, " (float32, float64, bfloat16, float16)");
  }
  return kF32;
}

bool fused_schedule() {
  const char* env = std::getenv("FIXNORM_CUDA_SCHEDULE");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "fused") == 0) return true;
  TORCH_CHECK(std::strcmp(env, "phased") == 0, "FIXNORM_CUDA_SCHEDULE must be 'fused' or 'phased', not '", env, "'");
  return false;
}

// Resident blocks of the fused kernel per multiprocessor, asked once per device.
int fused_blocks_per_sm(int device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cache[device], fixnorm_fused_kernel, kThreads, 0));
    cache[device] = std::max(cache[device], 1);
  }
  return cache[device];
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Host bytes to the device without blocking (from pinned memory, which the
// caching host allocator keeps until the copy is done).
at::Tensor upload(const void* data, int64_t bytes, const at::Device& device, cudaStream_t stream) {
  TORCH_CHECK(!capturing(stream),
              "fixnorm_step: this step needs a table upload (more than ", kInlineTensors, " tensors or ",
              kInlineGroups, " groups, or group hyperparameters given as a CPU table that is too large), "
              "which cannot be captured in a CUDA graph");
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), data, bytes);
  return host.to(device, /*non_blocking=*/true);
}

void check_device_tensor(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, int64_t dim,
                         const char* what) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.dim() == dim && t.is_contiguous(),
              "fixnorm_step: ", what, " must be a contiguous ", dim, "-D ", dtype, " tensor on ", device, " (got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device(), ")");
}

void fixnorm_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       const at::Tensor& hparams, const at::Tensor& meta, const at::Tensor& targets,
                       at::TensorList plan, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums) {
  // Everything is checked before the first launch, so a refused call changes nothing.
  TORCH_CHECK(!sums.has_value(), "fixnorm_step: the CUDA kernel does not report sums yet (pass sums=None)");
  const int64_t num_tensors = static_cast<int64_t>(params.size());
  TORCH_CHECK(num_tensors > 0, "fixnorm_step: no tensors");
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fixnorm_step: the CUDA kernel got a tensor on ", device);
  TORCH_CHECK(grads.size() == params.size(), "fixnorm_step: params and grads must have the same length (got ",
              params.size(), " and ", grads.size(), ")");
  TORCH_CHECK(plan.size() == 4, "fixnorm_step: the CUDA kernel needs the 4-tensor plan of dispatch.build_cuda_plan (got ",
              plan.size(), " tensors)");
  TORCH_CHECK(meta.device().is_cpu() && meta.scalar_type() == at::kLong && meta.dim() == 2 &&
                  meta.size(0) == num_tensors && meta.size(1) == kMetaCols && meta.is_contiguous(),
              "fixnorm_step: meta must be a contiguous CPU int64 tensor of shape [", num_tensors, ", ", kMetaCols, "]");
  TORCH_CHECK(hparams.scalar_type() == at::kDouble && hparams.dim() == 2 && hparams.size(1) == kHparamCols &&
                  hparams.is_contiguous() && (hparams.device().is_cpu() || hparams.device() == device),
              "fixnorm_step: hparams must be a contiguous float64 tensor of shape [groups, ", kHparamCols,
              "] on the CPU or on ", device);
  check_device_tensor(targets, device, at::kDouble, 1, "targets");
  check_device_tensor(plan[0], device, at::kLong, 2, "plan[0] (tensors)");
  check_device_tensor(plan[1], device, at::kLong, 2, "plan[1] (chunks)");
  check_device_tensor(plan[2], device, at::kInt, 1, "plan[2] (queue)");
  check_device_tensor(plan[3], device, at::kLong, 1, "plan[3] (segment slots)");
  TORCH_CHECK(plan[0].size(0) == num_tensors && plan[0].size(1) == kTensorCols,
              "fixnorm_step: plan[0] must have shape [", num_tensors, ", ", kTensorCols, "]");
  TORCH_CHECK(plan[1].size(1) == kChunkCols, "fixnorm_step: plan[1] must have ", kChunkCols, " columns");
  TORCH_CHECK(plan[3].size(0) == targets.numel() + 1,
              "fixnorm_step: plan[3] must have one entry per target plus one");
  const int64_t num_chunks = plan[1].size(0), num_items = plan[2].size(0), num_segments = targets.numel();
  TORCH_CHECK(num_items < (int64_t{1} << 30), "fixnorm_step: too many work items (", num_items, ")");
  for (const auto* opt : {&grad_scale, &found_inf}) {
    TORCH_CHECK(!opt->has_value() || ((*opt)->numel() == 1 && ((*opt)->device().is_cpu() ||
                                                              ((*opt)->device() == device &&
                                                               (*opt)->scalar_type() == at::kFloat))),
                "fixnorm_step: grad_scale and found_inf must be one-element tensors: float32 on ", device,
                ", or on the CPU");
  }

  const int64_t num_groups = hparams.size(0);
  const bool host_hparams = hparams.device().is_cpu();
  const double* h = host_hparams ? hparams.data_ptr<double>() : nullptr;
  const int64_t* m = meta.data_ptr<int64_t>();
  std::vector<TensorPtrs> ptrs(num_tensors);
  std::vector<uint8_t> flags(num_tensors);
  std::vector<bool> buffer_used(momentum_buffers.size(), false);
  for (int64_t i = 0; i < num_tensors; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const int64_t* row = m + i * kMetaCols;
    TORCH_CHECK(p.device() == device && g.device() == device, "fixnorm_step: tensor ", i, " is not on ", device);
    const at::ScalarType dtype = p.scalar_type();
    const uint8_t code = dtype_code(dtype);
    TORCH_CHECK(g.scalar_type() == dtype && g.sizes() == p.sizes(), "fixnorm_step: grad ", i, " (", g.scalar_type(),
                g.sizes(), ") does not match its param (", dtype, p.sizes(), ")");
    TORCH_CHECK(p.is_non_overlapping_and_dense() && g.strides() == p.strides(), "fixnorm_step: tensor ", i,
                " is not dense, or its grad has other strides than the param");
    TORCH_CHECK(row[kGroup] >= 0 && row[kGroup] < num_groups, "fixnorm_step: tensor ", i, " names group ",
                row[kGroup], " of ", num_groups);
    TORCH_CHECK(row[kMode] >= kNone && row[kMode] <= kMax, "fixnorm_step: tensor ", i, " has unknown mode ", row[kMode]);
    TORCH_CHECK(row[kNormDim] == -1 || row[kNormDim] == 0, "fixnorm_step: norm_dim must be -1 or 0 (tensor ", i, ")");
    const int64_t bi = row[kBuffer];
    const bool has_buf = bi >= 0;
    if (h != nullptr) {
      TORCH_CHECK(has_buf == (h[row[kGroup] * kHparamCols + kMomentum] != 0), "fixnorm_step: tensor ", i,
                  has_buf ? " has a momentum buffer but its group has no momentum" : " needs a momentum buffer");
    }
    void* buf = nullptr;
    if (has_buf) {
      TORCH_CHECK(bi < static_cast<int64_t>(momentum_buffers.size()) && !buffer_used[bi], "fixnorm_step: tensor ", i,
                  " names momentum buffer ", bi, ", which is out of range or already taken");
      buffer_used[bi] = true;
      const at::Tensor& b = momentum_buffers[bi];
      TORCH_CHECK(b.device() == device && b.scalar_type() == dtype && b.sizes() == p.sizes() &&
                      b.strides() == p.strides(),
                  "fixnorm_step: momentum buffer ", bi, " must be on ", device,
                  " with the dtype, shape and strides of param ", i);
      buf = b.data_ptr();
    }
    const bool rows = row[kNormDim] == 0 && p.dim() > 0;
    const int64_t segs = rows ? p.size(0) : 1;
    TORCH_CHECK(!rows || segs <= 1 || p.numel() == 0 || p.stride(0) == p.numel() / segs, "fixnorm_step: tensor ",
                i, " has norm_dim=0 but its dim-0 slices are not contiguous blocks (stride ", p.stride(0), ")");
    if (row[kMode] != kNone) {
      TORCH_CHECK(row[kTargetOffset] >= 0 && row[kTargetOffset] + segs <= num_segments, "fixnorm_step: tensor ", i,
                  " has target offset ", row[kTargetOffset], " outside targets (", num_segments, " entries)");
    }
    ptrs[i] = {p.data_ptr(), g.data_ptr(), buf};
    flags[i] = code | (has_buf ? kFlagBuffer : 0) | (has_buf && row[kInitBuffer] != 0 ? kFlagInit : 0);
  }
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (capturing(stream)) {
    // A graph replays its launch arguments: a step that creates buffers would
    // set them to the gradient on every replay.
    for (int64_t i = 0; i < num_tensors; ++i) {
      TORCH_CHECK(!(flags[i] & kFlagInit), "fixnorm_step: a step that creates momentum buffers cannot be "
                  "captured in a CUDA graph: take a warm-up step before capture");
    }
  }
  if (found_inf.has_value() && found_inf->device().is_cpu() && found_inf->item<double>() != 0.0) return;
  if (num_chunks == 0) return;
  const bool fused = fused_schedule();
  // StepArgs is large: build it on the heap, launch with a copy of it.
  auto a = std::make_unique<StepArgs>();
  std::memset(a.get(), 0, sizeof(StepArgs));
  a->tensors = plan[0].data_ptr<int64_t>();
  a->chunks = plan[1].data_ptr<int64_t>();
  a->queue = plan[2].data_ptr<int32_t>();
  a->seg_slots = plan[3].data_ptr<int64_t>();
  a->targets = targets.data_ptr<double>();
  a->num_chunks = num_chunks;
  a->num_items = num_items;
  at::Tensor keep_hparams, keep_ptrs;  // device copies that must outlive the launch call
  if (host_hparams && num_groups <= kInlineGroups) {
    a->inline_hparams = 1;
    std::memcpy(a->hparams, h, num_groups * kHparamCols * sizeof(double));
  } else if (host_hparams) {
    keep_hparams = upload(h, num_groups * kHparamCols * sizeof(double), device, stream);
    a->hparams_table = reinterpret_cast<const double*>(keep_hparams.data_ptr());
  } else {
    a->hparams_table = hparams.data_ptr<double>();
  }
  if (num_tensors <= kInlineTensors) {
    a->inline_ptrs = 1;
    std::memcpy(a->ptrs, ptrs.data(), num_tensors * sizeof(TensorPtrs));
    std::memcpy(a->flags, flags.data(), num_tensors);
  } else {
    // One upload: the pointers, then the flags.
    const int64_t ptr_bytes = num_tensors * static_cast<int64_t>(sizeof(TensorPtrs));
    std::vector<uint8_t> table(ptr_bytes + num_tensors);
    std::memcpy(table.data(), ptrs.data(), ptr_bytes);
    std::memcpy(table.data() + ptr_bytes, flags.data(), num_tensors);
    keep_ptrs = upload(table.data(), static_cast<int64_t>(table.size()), device, stream);
    a->ptrs_table = reinterpret_cast<const TensorPtrs*>(keep_ptrs.data_ptr());
    a->flags_table = keep_ptrs.data_ptr<uint8_t>() + ptr_bytes;
  }
  if (grad_scale.has_value()) {
    a->has_grad_scale = 1;
    if (grad_scale->device().is_cpu()) {
      a->grad_scale_value = grad_scale->item<double>();
    } else {
      a->grad_scale_ptr = grad_scale->data_ptr<float>();
    }
  }
  if (found_inf.has_value() && !found_inf->device().is_cpu()) a->found_inf_ptr = found_inf->data_ptr<float>();

  // Scratch from the caching allocator (stream ordered, so reuse is safe):
  // norm partials (at most one per chunk plus one per segment), factors, and
  // for the fused schedule its counters, zeroed here.
  const int64_t counter_ints = fused ? 1 + num_tensors : 0;
  at::Tensor scratch = at::empty({num_chunks + 2 * num_segments + (counter_ints + 1) / 2},
                                 at::TensorOptions().dtype(at::kDouble).device(device));
  a->partials = scratch.data_ptr<double>();
  a->factors = a->partials + num_chunks + num_segments;
  a->counters = reinterpret_cast<int32_t*>(a->factors + num_segments);

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  if (fused) {
    C10_CUDA_CHECK(cudaMemsetAsync(a->counters, 0, counter_ints * sizeof(int32_t), stream));
    const int per_sm = fused_blocks_per_sm(device.index());
    const int64_t grid = std::min<int64_t>(num_items, static_cast<int64_t>(per_sm) * sms);
    fixnorm_fused_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(*a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t max_grid = static_cast<int64_t>(sms) * 32;
    const unsigned chunk_grid = static_cast<unsigned>(std::min(num_chunks, max_grid));
    const unsigned tensor_grid = static_cast<unsigned>(std::min(num_tensors, max_grid));
    fixnorm_norm_pass_kernel<<<chunk_grid, kThreads, 0, stream>>>(*a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fixnorm_finalize_kernel<<<tensor_grid, kThreads, 0, stream>>>(*a, num_tensors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fixnorm_apply_pass_kernel<<<chunk_grid, kThreads, 0, stream>>>(*a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fixnorm_ext, CUDA, m) {
  m.impl("fixnorm_step", &fixnorm_step_cuda);
}

}  // namespace fixnorm_ext
