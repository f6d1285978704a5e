// Schemas of zslfast's compiled kernels, namespace `zslfast`. Kernels only: autograd, fake kernels, input checks
// and backend choice live in Python (zslfast/ops/), as torchvision keeps autograd apart from its kernels.
// Each csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu registers its implementation with TORCH_LIBRARY_IMPL.
//
// Names start with an underscore: they are not the public ops (those are zslfast::prototype_scores etc., defined
// in Python with autograd). Inputs reach them validated, of one floating dtype, on one device.
#include <torch/library.h>

TORCH_LIBRARY(zslfast, m) {
  // prototype_scores, w of shape (B, C, K): out[b, c] = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])
  //   e (B, K), s (C, K), w (B, C, K) -> out (B, C)
  m.def("_prototype_scores_fwd(Tensor e, Tensor s, Tensor w) -> Tensor");
  //   grad (B, C) -> grad_e (B, K), grad_s (C, K), grad_w (B, C, K), or an empty grad_w when need_grad_w is false
  m.def("_prototype_scores_bwd(Tensor grad, Tensor e, Tensor s, Tensor w, bool need_grad_w) -> (Tensor, Tensor, Tensor)");

  // cosine_logits: out[n, c] = scale * <x[n], p[c]> / (max(|x[n]|, eps) * max(|p[c]|, eps))
  //   x (N, D), protos (C, D), scale () a tensor (learnable, read on the device) -> out (N, C), x_inv_norm (N,),
  //   p_inv_norm (C,)   [inv_norm = 1 / max(|.|, eps), in float (double for double inputs)]
  //   eps_mode 0 = clamp (as above, F.normalize's), 1 = add: <x, p> / ((|x| + eps) * (|p| + eps)), inv_norm =
  //   1 / (|.| + eps) (GEM-ZSL's and PSVMA's x / (|x| + eps))
  m.def("_cosine_logits_fwd(Tensor x, Tensor protos, Tensor scale, float eps, int eps_mode) -> (Tensor, Tensor, Tensor)");
  //   grad (N, C) -> grad_x (N, D), grad_protos (C, D), grad_scale () = sum(grad * cos); an output whose
  //   output_mask entry is false comes back empty. sum(grad * cos) is not derived from out / scale (scale may be 0).
  m.def("_cosine_logits_bwd(Tensor grad, Tensor x, Tensor protos, Tensor x_inv_norm, Tensor p_inv_norm, Tensor scale, float eps, int eps_mode, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // attention_rollout, CLS row: a vector-matrix chain over the layers, each layer's maps read once.
  //   attns: L tensors (B, H, N, N); mode 0 = abnar (walk layers last to first: v <- v rownorm(fuse(A) + I)),
  //   1 = residual (walk first to last: v <- v T for the first layer, v <- v + v T after); fusion 0 mean, 1 sum,
  //   2 max, 3 min; normalize 0 = row (abnar's division by the row sums of F + I), 1 = none (abnar walks the
  //   plain products of F + I; residual ignores it). Returns out (B, N) and states (L, B, N): the vector entering
  //   each layer's step (for backward).
  m.def("_attention_rollout_cls_fwd(Tensor[] attns, int mode, int fusion, int normalize) -> (Tensor, Tensor)");

  // attribute_attention: E = softmax(q k^T * scale over kept r) v, then a cosine/dot score against ref per row.
  //   q (K, D) or (B, K, D), k (B, R, D), v (B, R, Dv), ref (K, Dv) | (B, K, Dv) (needed unless score_mode is 0),
  //   mask (B, R) bool (True = kept); score_mode 0 = E, 1 = <E, ref>, 2 = cos(E, ref) with F.cosine_similarity's
  //   clamp <E, ref> / (max(|E|, eps) * max(|ref|, eps)) (eps defaults to F.cosine_similarity's 1e-8)
  //   -> out ((B, K, Dv) for mode 0, else (B, K)), e (B, K, Dv) in float/double (empty for mode 0, where out is E),
  //      lse (B, K) float/double (0 for fully masked rows), attn (B, K, R) when return_attention, else empty;
  //      save_e false (no backward to come): e comes back empty for modes 1 and 2, E is never written out;
  //   options (zslfast/ops/attribute_attention.py): softmax_over 0 = over the keys r, 1 = over the queries i (lse is
  //   then (B, R)); activation 0 = none, 1 = relu(q k^T) before the scale; max_mode 0 = none, 1 = the max over kept
  //   r of P, 2 = of the scaled logits -> best (B, K) float/double and best_index (B, K) int32 (its first r, -1 for
  //   a row with no kept r; 0 then for best), empty for max_mode 0
  m.def("_attribute_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? ref, Tensor? mask, float scale, int score_mode, bool return_attention, bool save_e, float eps=1e-08, int softmax_over=0, int activation=0, int max_mode=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  //   grad (like out), grad_attn None/empty or (B, K, R), e = E (B, K, Dv) -> grad_q, grad_k, grad_v, grad_ref;
  //   an output whose output_mask entry is false (or grad_ref for mode 0) comes back empty; eps and the options as
  //   in the forward; grad_max (B, K) or None with best (B, K) and best_index (B, K) int32 from the forward
  m.def("_attribute_attention_bwd(Tensor grad, Tensor? grad_attn, Tensor q, Tensor k, Tensor v, Tensor? ref, Tensor? mask, Tensor e, Tensor lse, float scale, int score_mode, bool[4] output_mask, float eps=1e-08, int softmax_over=0, int activation=0, int max_mode=0, Tensor? grad_max=None, Tensor? best=None, Tensor? best_index=None) -> (Tensor, Tensor, Tensor, Tensor)");

  // memory_bank update, in place: features (C, M, K, D), confidences (C, M, K), counts (C, M) int64, next_slot
  //   (C, M) int64, stale (C, M) bool (set where a queue changed); offers z (N, M, D), y (N,) int64, conf (N, M);
  //   policy 0 fifo, 1 min_conf. Entry (n, m) goes to queue (y[n], m) when conf > threshold and z[n, m] is finite.
  m.def("_memory_bank_update(Tensor(a!) features, Tensor(b!) confidences, Tensor(c!) counts, Tensor(d!) next_slot, Tensor(e!) stale, Tensor z, Tensor y, Tensor conf, float threshold, int policy) -> ()");
  //   refresh: means (C, M, D) = mean of the stored slots of each stale queue; stale cleared
  m.def("_memory_bank_refresh(Tensor features, Tensor counts, Tensor(a!) stale, Tensor(b!) means) -> ()");
  // memory_bank_kl: mean over active (b, m) of KL(softmax(z[b, m]) || softmax(protos[labels[b], m]))
  //   z (B, M, D), protos (C, M, D), labels (B,) int64, active (B, M) bool -> loss (), grad_z (B, M, D) = dloss/dz
  //   (empty when compute_grad is false)
  m.def("_memory_bank_kl(Tensor z, Tensor protos, Tensor labels, Tensor active, bool compute_grad) -> (Tensor, Tensor)");
}

// `import zslfast._C` loads the shared library, which runs the registrations above. The module itself is empty.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
