// The ids of the ops' string options as the compiled kernels take them. Their home is zslfast/_enums.py: each struct
// here is the IntEnum of the same name there, each member k + that member's name in CamelCase (MIN_CONF: kMinConf).
// tests/test_spec.py checks that the two agree. The schemas in csrc/ops.cpp name these structs.
#pragma once

#include <cstdint>

namespace zslfast {

struct Score {  // attribute_attention's score
  enum : int64_t { kNone = 0, kDot = 1, kCosine = 2 };
};

struct Policy {  // memory_bank_update's policy
  enum : int64_t { kFifo = 0, kMinConf = 1 };
};

struct Mode {  // attention_rollout's mode
  enum : int64_t { kAbnar = 0, kResidual = 1 };
};

struct HeadFusion {  // attention_rollout's head_fusion
  enum : int64_t { kMean = 0, kSum = 1, kMax = 2, kMin = 3 };
};

struct Normalize {  // attention_rollout's normalize
  enum : int64_t { kRow = 0, kNone = 1 };
};

struct EpsMode {  // cosine_logits' eps_mode
  enum : int64_t { kClamp = 0, kAdd = 1 };
};

struct SoftmaxOver {  // attribute_attention's softmax_over
  enum : int64_t { kKeys = 0, kQueries = 1, kNone = 2 };
};

struct LogitActivation {  // attribute_attention's logit_activation
  enum : int64_t { kNone = 0, kRelu = 1 };
};

struct ReturnMax {  // attribute_attention's return_max
  enum : int64_t { kNone = 0, kAttention = 1, kLogits = 2 };
};

struct ReturnAttention {  // attribute_attention's return_attention
  enum : int64_t { kNone = 0, kAttention = 1, kLogits = 2 };
};

}  // namespace zslfast
