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

}  // namespace fixnorm_ext
