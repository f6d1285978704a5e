"""``python -m zslfast bench``: a quick eager-vs-zslfast table of each op at the papers' shapes on the current device:
forward + backward time (median of a few runs) and peak extra memory of one call. ``--compile`` adds torch.compile
of the eager code (its first call compiles, outside the timing). The full suite is
``pytest benchmarks/ --benchmark-only``."""

import argparse
import statistics
import sys
import time

import torch

import zslfast

from . import _backend, attention_rollout, available_backends, baselines, cosine_logits, prototype_scores
from ._memory import peak_bytes

SCALE = 16.0  # the cosine heads' temperature in the table (SVIP/SAGE-like)


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


def cases(device: torch.device):
    """(title, eager fn, zslfast fn, make_inputs, how many inputs take gradients) at the papers' shapes; the inputs
    are made only for the cases that run."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=device, generator=g).requires_grad_(grad)

    for name, (B, C, K) in {"AwA2": (50, 50, 85), "CUB": (50, 200, 312), "SUN": (64, 717, 102)}.items():
        yield (f"prototype_scores {name} B={B} C={C} K={K}", baselines.prototype_scores, prototype_scores,
               lambda B=B, C=C, K=K: (randn(B, K), randn(C, K), randn(B, C, K)), 3)
    for name, (N, C, D) in {"CUB": (64, 200, 768), "SUN": (64, 717, 768)}.items():
        yield (f"cosine_logits {name} N={N} C={C} D={D}", lambda x, p: baselines.cosine_logits(x, p, SCALE),
               lambda x, p: cosine_logits(x, p, SCALE),
               lambda N=N, C=C, D=D: (randn(N, D), randn(C, D)), 2)
    for name, (B, K, R, D) in {"AwA2": (64, 85, 49, 300), "CUB": (64, 312, 49, 300), "ViT": (64, 312, 197, 768)}.items():
        yield (f"attribute_attention {name} B={B} K={K} R={R} D={D}", baselines.attribute_attention,
               lambda q, k, v, ref: zslfast.attribute_attention(q, k, v, ref),
               lambda B=B, K=K, R=R, D=D: (randn(K, D), randn(B, R, D), randn(B, R, D), randn(K, D)), 4)
    M, D = 3, 768
    for B, C in ((128, 200), (256, 717)):
        yield (f"memory_bank_kl B={B} C={C} M={M} D={D}", baselines.memory_bank_kl, zslfast.memory_bank_kl,
               lambda B=B, C=C: (randn(B, M, D), randn(C, M, D, grad=False),
                                 torch.randint(0, C, (B,), device=device, generator=g),
                                 torch.rand(B, M, device=device, generator=g) < 0.5), 1)
    yield ("attention_rollout ViT-B/16 L=12 B=8 H=12 N=197", lambda *attns: baselines.attention_rollout(attns),
           lambda *attns: attention_rollout(list(attns)),
           lambda: tuple(randn(8, 12, 197, 197, grad=False).softmax(-1).requires_grad_() for _ in range(12)), 12)


def _train_step(fn, inputs, num_grad):
    grad_out = None

    def step():
        nonlocal grad_out
        out = fn(*inputs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return torch.autograd.grad(out, inputs[:num_grad], grad_out)

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zslfast bench", description=__doc__)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager code")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default="", help="run only the cases whose title contains this text")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = _backend.BUILD_INFO
    if _backend.extension_warning():
        print(_backend.extension_warning(), file=sys.stderr)
    print(f"zslfast on torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f" ({torch.get_num_threads()} threads)")
    print(f"extension: {'built for torch ' + info.TORCH_VERSION + (', with CUDA kernels' if info.WITH_CUDA else ', CPU only') if info else _backend.EXTENSION_ERROR}")
    print(f"backends for {device.type} tensors: {', '.join(available_backends(device))}\n")

    header = (f"{'forward+backward':52s} {'eager ms':>9s} " + (f"{'compile':>9s} " if args.compile else "")
              + f"{'zslfast':>9s} {'speed-up':>9s} {'eager MiB':>10s} {'zslfast MiB':>12s}")
    print(header)
    for title, eager, fused, make_inputs, num_grad in cases(device):
        if args.only not in title:
            continue
        inputs = make_inputs()
        eager_step = _train_step(eager, inputs, num_grad)
        fused_step = _train_step(fused, inputs, num_grad)
        eager_ms = _median_ms(eager_step, args.repeats)
        row = f"{title:52s} {eager_ms:9.3f} "
        if args.compile:
            row += f"{_median_ms(_train_step(torch.compile(eager), inputs, num_grad), args.repeats):9.3f} "
        fused_ms = _median_ms(fused_step, args.repeats)
        eager_mib, fused_mib = (peak_bytes(step, device) / 2**20 for step in (eager_step, fused_step))
        print(row + f"{fused_ms:9.3f} {eager_ms / fused_ms:8.2f}x {eager_mib:10.1f} {fused_mib:12.1f}", flush=True)
