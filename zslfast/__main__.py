"""``python -m zslfast``: what was built, which backends run here, and a quick eager-vs-zslfast timing of each op
at the papers' shapes (forward + backward, median of a few runs). ``--compile`` adds torch.compile of the eager
code (its first call compiles, outside the timing). The full suite is ``pytest benchmarks/ --benchmark-only``."""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from . import _backend, attention_rollout, available_backends, cosine_logits, prototype_scores


def _eager_prototype_scores(e, s, w):
    sw = w * s + s
    return (e[:, None] * sw).sum(-1)


def _eager_cosine_logits(x, p):
    return 16.0 * F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).T


def _eager_rollout(*attns):
    result = None
    for attn in attns:
        a = attn.mean(dim=1) + torch.eye(attn.shape[-1], device=attn.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else torch.bmm(a, result)
    return result[:, 0]


def _median_ms(fn, repeats):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _train_step(fn, inputs):
    grad_out = None

    def step():
        nonlocal grad_out
        out = fn(*inputs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, grad_out)

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zslfast", description=__doc__)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager code")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = _backend.BUILD_INFO
    print(f"zslfast on torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f" ({torch.get_num_threads()} threads)")
    print(f"extension: {'built for torch ' + info.TORCH_VERSION + (', with CUDA kernels' if info.WITH_CUDA else ', CPU only') if info else _backend.EXTENSION_ERROR}")
    print(f"backends for {device.type} tensors: {', '.join(available_backends(device))}\n")

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g).requires_grad_()

    cases = []
    for name, (B, C, K) in {"AwA2": (50, 50, 85), "CUB": (50, 200, 312), "SUN": (64, 717, 102)}.items():
        inputs = (randn(B, K), randn(C, K), randn(B, C, K))
        cases.append((f"prototype_scores {name} B={B} C={C} K={K}", _eager_prototype_scores, prototype_scores, inputs))
    for name, (N, C, D) in {"CUB": (64, 200, 768), "SUN": (64, 717, 768)}.items():
        inputs = (randn(N, D), randn(C, D))
        cases.append((f"cosine_logits {name} N={N} C={C} D={D}", _eager_cosine_logits,
                      lambda x, p: cosine_logits(x, p, 16.0), inputs))

    maps = tuple(torch.randn(8, 12, 197, 197, device=device, generator=g).softmax(-1).requires_grad_() for _ in range(12))
    cases.append(("attention_rollout ViT-B/16 L=12 B=8 H=12 N=197", _eager_rollout,
                  lambda *attns: attention_rollout(list(attns)), maps))

    header = f"{'forward+backward, median ms':48s} {'eager':>9s} " + (f"{'compile':>9s} " if args.compile else "") + f"{'zslfast':>9s} {'speed-up':>9s}"
    print(header)
    for title, eager, fused, inputs in cases:
        eager_ms = _median_ms(_train_step(eager, inputs), args.repeats)
        row = f"{title:48s} {eager_ms:9.3f} "
        if args.compile:
            row += f"{_median_ms(_train_step(torch.compile(eager), inputs), args.repeats):9.3f} "
        fused_ms = _median_ms(_train_step(fused, inputs), args.repeats)
        print(row + f"{fused_ms:9.3f} {eager_ms / fused_ms:8.2f}x")


if __name__ == "__main__":
    main()
