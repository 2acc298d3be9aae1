// Layout of the small tables that describe one fused FixNorm step. Python
// (fixnorm_ext/dispatch.py) builds them; every device implementation reads
// them. Keep the two in sync.
#pragma once

#include <cstdint>

namespace fixnorm_ext {

// hparams: float64 [num_groups, kHparamCols]
enum HparamCol : int64_t {
  kLr = 0,
  kMomentum = 1,
  kDampening = 2,
  kWeightDecay = 3,
  kNesterov = 4,  // 0 or 1
  kMaximize = 5,  // 0 or 1
  kHparamCols = 6,
};

// meta: int64 [num_tensors, kMetaCols]
enum MetaCol : int64_t {
  kGroup = 0,         // row of hparams
  kMode = 1,          // NormMode
  kNormDim = 2,       // -1: whole tensor is one segment; 0: each dim-0 slice is a segment
  kInitBuffer = 3,    // 1: the momentum buffer is new, set it to the gradient
  kTargetOffset = 4,  // first entry of this tensor's segment targets in `targets`
  kBuffer = 5,        // index in momentum_buffers, -1 when the group has no momentum
  kMetaCols = 6,
};

enum NormMode : int64_t { kNone = 0, kFixed = 1, kMax = 2 };

// The CUDA kernel also takes a plan: four device tensors built once per
// parameter layout by dispatch.build_cuda_plan and kept between steps. The
// work is cut into chunks; a tensor with norm control gets a norm pass
// (read only: the updated weights' sums of squares) and an apply pass (the
// update, rescaled) over each of its chunks, other tensors an apply pass only.
//
// plan[0] tensors: int64 [num_tensors, kTensorCols]
enum TensorCol : int64_t {
  kNumel = 0,
  kTensorGroup = 1,
  kTensorMode = 2,
  kSegLen = 3,      // elements per segment
  kSegBegin = 4,    // first segment (index into targets), -1 without norm control
  kNumSegs = 5,     // 0 without norm control
  kChunkBegin = 6,  // the tensor's chunks are [kChunkBegin, kChunkEnd) of plan[1]
  kChunkEnd = 7,
  kTensorCols = 8,
};

// plan[1] chunks: int64 [num_chunks, kChunkCols]. A chunk is part of one
// segment (kChunkSegs = 1) or several whole segments of one tensor; each of
// its segments owns one norm partial, from kChunkSlot0 on.
enum ChunkCol : int64_t {
  kChunkTensor = 0,
  kChunkStart = 1,  // first element, in the tensor
  kChunkLen = 2,
  kChunkSeg0 = 3,   // its first segment, -1 without norm control
  kChunkSegs = 4,   // segments in the chunk (0 without norm control)
  kChunkSlot0 = 5,  // first norm partial, -1 without norm control
  kChunkCols = 6,
};

// plan[2] queue: int32 [num_items], each chunk * 2 + pass, the order in which
// the fused schedule hands work out: every norm pass of a tensor comes before
// any of its apply passes.
enum Pass : int32_t { kNormPass = 0, kApplyPass = 1 };

// plan[3] segment slots: int64 [num_segments + 1]; the norm partials of
// segment s are [slots[s], slots[s + 1]), summed in that order.

}  // namespace fixnorm_ext
