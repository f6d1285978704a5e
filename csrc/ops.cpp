// Schemas of zslfast's compiled kernels, namespace `zslfast`. Kernels only: autograd, fake kernels, input checks
// and backend choice live in Python (zslfast/ops/), as torchvision keeps autograd apart from its kernels.
// Each csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu registers its implementation with TORCH_LIBRARY_IMPL.
//
// Names start with an underscore: they are not the public ops (those are zslfast::prototype_scores etc., defined
// in Python with autograd). Inputs reach them validated, of one floating dtype, on one device.
//
// Each raw kernel takes its public op's arguments, in the op's order and under the op's names, minus ``backend``
// (zslfast/ops/_spec.py hands them on as they come), with no defaults. An op's string option arrives as its int id:
// ``int score`` is the id of zslfast/_enums.py's Score (csrc/enums.h: Score::kCosine ...), and so on.
#include <torch/library.h>

TORCH_LIBRARY(zslfast, m) {
  // prototype_scores, w of shape (B, C, K): out[b, c] = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])
  //   e (B, K), s (C, K), w (B, C, K) -> out (B, C)
  m.def("_prototype_scores_fwd(Tensor e, Tensor s, Tensor w) -> Tensor");
  //   grad (B, C) -> grad_e (B, K), grad_s (C, K), grad_w (B, C, K); each empty where output_mask is false
  m.def("_prototype_scores_bwd(Tensor grad, Tensor e, Tensor s, Tensor w, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");

  // cosine_logits: out[n, c] = scale * <x[n], p[c]> * ix[n] * ip[c]  (zslfast/ops/cosine_logits.py)
  //   x (N, D), protos (C, D), scale () a tensor (learnable, read on the device), eps_mode EpsMode -> out (N, C),
  //   x_inv_norm (N,), p_inv_norm (C,)   [ix = 1 / max(|.|, eps) (kClamp) or 1 / (|.| + eps) (kAdd), in float,
  //   double for double inputs]
  m.def("_cosine_logits_fwd(Tensor x, Tensor protos, Tensor scale, float eps, int eps_mode)"
        " -> (Tensor, Tensor, Tensor)");
  //   grad (N, C) -> grad_x (N, D), grad_protos (C, D), grad_scale () = sum(grad * cos); an output whose
  //   output_mask entry is false comes back empty. out (the forward's, None or (N, C)) is not read: the compiled
  //   backwards reduce over all of D. sum(grad * cos) is not derived from out / scale (scale may be 0).
  m.def("_cosine_logits_bwd(Tensor grad, Tensor x, Tensor protos, Tensor? out, Tensor x_inv_norm,"
        " Tensor p_inv_norm, Tensor scale, float eps, int eps_mode, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // attention_rollout, CLS row: a vector-matrix chain over the layers, each layer's maps read once
  //   (zslfast/ops/attention_rollout.py). attns: L tensors (B, H, N, N); mode Mode, head_fusion HeadFusion,
  //   normalize Normalize (read by kAbnar only). Returns out (B, N) and states (L, B, N): the vector entering each
  //   layer's step (for backward).
  m.def("_attention_rollout_cls_fwd(Tensor[] attns, int mode, int head_fusion, int normalize) -> (Tensor, Tensor)");

  // attribute_attention (the math: zslfast/ops/attribute_attention.py): score Score, return_attention
  //   ReturnAttention, softmax_over SoftmaxOver, logit_activation LogitActivation, return_max ReturnMax.
  //   q (K, D) or (N, K, D), k (N, R, D), v (N, R, Dv), ref (K, Dv) | (N, K, Dv) (needed unless score is kNone),
  //   mask (N, R) bool (True = kept), bias (B, H, K, R) with B·H = N, any strides (0 where broadcast): batch n reads
  //   bias[n / H, n % H] (heads are folded into the batch N before the kernels)
  //   -> out ((N, K, Dv) for kNone, else (N, K)), e (N, K, Dv) in float/double (empty for kNone, where out is E),
  //      lse (N, K) float/double ((N, R) over the queries, empty for SoftmaxOver::kNone; 0 for fully masked rows),
  //      attn (N, K, R): P (kAttention) or S with masked entries -inf (kLogits), else empty; save_e false (no
  //      backward to come): e comes back empty for kDot and kCosine, E is never written out; best (N, K)
  //      float/double and best_index (N, K) int32 (its first r, -1 for a row with no kept r; 0 then for best),
  //      empty for return_max kNone
  m.def("_attribute_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? ref, Tensor? mask, Tensor? bias,"
        " float scale, int score, float eps, int return_attention, bool save_e, int softmax_over,"
        " int logit_activation, int return_max) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  //   grad (like out), grad_attn None/empty or (N, K, R) (of the returned P: into dP; of S: into dS), grad_max None
  //   or (N, K), e = E (N, K, Dv), lse, best and best_index from the forward -> grad_q, grad_k, grad_v, grad_ref,
  //   grad_bias = dS (N, K, R) contiguous (0 at masked entries; the op sums it to the bias's shape); an output whose
  //   output_mask entry is false (or grad_ref for kNone, grad_bias without bias) comes back empty
  m.def("_attribute_attention_bwd(Tensor grad, Tensor? grad_attn, Tensor? grad_max, Tensor q, Tensor k, Tensor v,"
        " Tensor? ref, Tensor? mask, Tensor? bias, Tensor e, Tensor lse, Tensor best, Tensor best_index, float scale,"
        " int score, float eps, bool[5] output_mask, int return_attention, int softmax_over, int logit_activation,"
        " int return_max) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // memory_bank update, in place: features (C, M, K, D), confidences (C, M, K), counts (C, M) int64, next_slot
  //   (C, M) int64, stale (C, M) bool (set where a queue changed); offers z (N, M, D), y (N,) int64, conf (N, M);
  //   policy Policy. Entry (n, m) goes to queue (y[n], m) when conf > threshold and z[n, m] is finite.
  m.def("_memory_bank_update(Tensor(a!) features, Tensor(b!) confidences, Tensor(c!) counts, Tensor(d!) next_slot,"
        " Tensor(e!) stale, Tensor z, Tensor y, Tensor conf, float threshold, int policy) -> ()");
  //   refresh: means (C, M, D) = mean of the stored slots of each stale queue; stale cleared
  m.def("_memory_bank_refresh(Tensor features, Tensor counts, Tensor(a!) stale, Tensor(b!) means) -> ()");
  // memory_bank_kl: mean over active (b, m) of KL(softmax(z[b, m]) || softmax(protos[labels[b], m]))
  //   z (B, M, D), protos (C, M, D), labels (B,) int64, active (B, M) bool -> loss (), grad_z (B, M, D) = dloss/dz
  //   (empty when output_mask[0] is false)
  m.def("_memory_bank_kl(Tensor z, Tensor protos, Tensor labels, Tensor active, bool[1] output_mask)"
        " -> (Tensor, Tensor)");
}

// `import zslfast._C` loads the shared library, which runs the registrations above. The module itself is empty.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
