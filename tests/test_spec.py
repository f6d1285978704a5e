"""One op, one spec: what every op shares through zslfast/ops/_spec.py, checked op by op.

The registry (each op's backends and autocast rule), the one backend choice for modules (a module rejects a backend
one of its ops lacks), the kernels' contract (every kernel takes its op's own arguments, the options as the ids of
zslfast/_enums.py, which csrc/enums.h copies), and the arguments every op takes the same way (eps, start_layer,
output_mask). What every op record keeps (the reference and baselines as oracles, each backend running its own
kernel, ...): test_contract.py.
"""

import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest
import torch
import torch.nn.functional as F

import zslfast
from helpers import DEVICE_BACKENDS, require_backend
from zslfast import _enums, ops, reference
from zslfast.nn import AttentionRollout, MemoryBank, MemoryBankGuidedFusion
from zslfast.ops import _spec

CPU_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[0] == "cpu"]

# Every OpSpec the op modules define, by name
SPECS = {
    value.name: value
    for module in pkgutil.iter_modules(ops.__path__)
    for value in vars(importlib.import_module(f"zslfast.ops.{module.name}")).values()
    if isinstance(value, _spec.OpSpec)
}

def test_every_registered_op_has_one_spec():
    """Each public zslfast:: op (not the raw kernels of zslfast._C, named _<op>_...) is defined by a spec."""
    registered = {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("zslfast::") and not name.startswith("zslfast::_")
    }
    assert registered == set(SPECS)


@pytest.mark.parametrize(
    "name,backends,autocast",
    [
        ("prototype_scores", ("reference", "cpu", "cuda", "triton"), "lower"),
        ("prototype_scores_factored", ("reference", "cpu", "cuda", "triton"), "lower"),
        ("cosine_logits", ("reference", "cpu", "cuda", "triton"), "lower"),
        ("attribute_attention", ("reference", "cpu", "triton"), "lower"),
        ("attention_rollout_cls", ("reference", "cpu", "triton"), None),
        ("memory_bank_kl", ("reference", "cpu", "triton"), "fp32"),
        ("memory_bank_update", ("reference", "cpu", "cuda"), None),
        ("memory_bank_refresh", ("reference", "cpu", "cuda"), None),
    ],
)
def test_spec_declares_backends_and_autocast(name, backends, autocast):
    spec = SPECS[name]
    assert spec.backends == backends
    assert spec.autocast == autocast
    assert spec.resolve("reference", torch.device("cpu")) == "reference"


def test_unknown_backend_or_autocast_in_a_spec_is_refused():
    with pytest.raises(ValueError, match="unknown backends"):
        _spec.OpSpec(name="x", schema="() -> ()", kernels={"metal": print}, fake=print)
    with pytest.raises(ValueError, match="autocast"):
        _spec.OpSpec(name="x", schema="() -> ()", kernels={}, fake=print, autocast="bf16")


def test_enums_map_python_strings_to_kernel_ids():
    assert _enums.enum_id("score", None) == 0 and _enums.enum_id("score", "cosine") == 2
    assert _enums.choices("mode") == ("abnar", "residual")
    assert _enums.choices("head_fusion") == ("mean", "sum", "max", "min")
    assert _enums.choices("policy") == ("fifo", "min_conf")


def test_csrc_enums_copy_zslfast_enums():
    """csrc/enums.h, the compiled kernels' ids, holds each IntEnum of zslfast/_enums.py under its name, each member
    as k + its name in CamelCase with the same value, and nothing else: a new or renumbered id that reaches one side
    only fails here rather than as a wrong branch inside a kernel."""
    header = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "enums.h").read_text()
    structs = re.findall(r"struct (\w+) \{[^{}]*enum : int64_t \{([^}]*)\};", header)
    cpp = {name: dict((m, int(v)) for m, v in re.findall(r"(k\w+) = (\d+)", body)) for name, body in structs}
    python = {
        kind.__name__: {"k" + m.name.title().replace("_", ""): int(m) for m in kind}
        for kind in {type(member) for values in _enums.ENUMS.values() for member in values.values()}
    }
    assert cpp == python


def _op_arguments(spec):
    """The op's (name, type) arguments minus backend, the options typed as the kernels take them (int ids)."""
    options = dict(_spec.enum_arguments(spec.op._schema))
    return [(a.name, "int" if i in options else str(a.type))
            for i, a in enumerate(spec.op._schema.arguments) if a.name != "backend"]


KERNELS = [
    pytest.param(name, backend, id=f"{name}-{backend}")
    for name, spec in SPECS.items() for backend in spec.kernels
]


@pytest.mark.parametrize("name,backend", KERNELS)
def test_each_kernel_takes_its_ops_arguments(name, backend):
    """No adapter between an op and its kernels: each raw C++ schema (csrc/ops.cpp) lists the op's arguments under
    their names and in their order, the options as ints, none defaulted; each Triton entry point takes the same
    names in the same order."""
    spec = SPECS[name]
    kernel = spec.kernels[backend]
    if backend == "triton":
        module, function = kernel.target
        parameters = list(inspect.signature(getattr(importlib.import_module(module), function)).parameters)
        assert parameters == [a for a, _ in _op_arguments(spec)]
        return
    require_backend("cpu")
    raw = getattr(torch.ops.zslfast, kernel.__name__).default._schema
    assert [(a.name, str(a.type)) for a in raw.arguments] == _op_arguments(spec)
    assert not any(a.has_default_value() for a in raw.arguments)


def test_modules_reject_a_backend_one_of_their_ops_lacks():
    with pytest.raises(zslfast.BackendUnavailableError, match="memory_bank_update"):
        MemoryBank(2, 1, 2, 3, threshold=0.5, backend="triton")
    bank = MemoryBank(2, 1, 2, 3, threshold=0.5)
    with pytest.raises(zslfast.BackendUnavailableError, match="memory_bank_update"):
        bank.backend = "triton"
    with pytest.raises(zslfast.BackendUnavailableError, match="memory_bank_kl"):
        MemoryBankGuidedFusion(3, 2, 4, 2, threshold=0.1, alpha=1.0, scale=2.0, backend="cuda")
    with pytest.raises(zslfast.BackendUnavailableError, match="attention_rollout_cls"):
        AttentionRollout(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        AttentionRollout(backend="metal")


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_start_layer_one_rule(device, backend, generator):
    """[-L, L) everywhere, negative from the end: the op, the module and the reference agree."""
    maps = torch.rand(4, 2, 3, 6, 6, generator=generator, dtype=torch.float64).softmax(-1)
    for mode in ("abnar", "residual"):
        want = reference.attention_rollout(list(maps), mode, "mean", 1, True)
        got = zslfast.attention_rollout(maps, mode=mode, start_layer=-3, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        module = AttentionRollout(mode, start_layer=-3, backend=backend)
        torch.testing.assert_close(module(maps), want, rtol=1e-10, atol=1e-10)
    for bad in (4, -5):
        with pytest.raises(ValueError, match=r"start_layer must be in \[-L, L\) = \[-4, 4\)"):
            zslfast.attention_rollout(maps, start_layer=bad, backend=backend)
    with pytest.raises(TypeError, match="cls_only must be a bool"):
        zslfast.attention_rollout(maps, cls_only="no", backend=backend)


def _small_norm_rows(generator, *shape):
    t = torch.randn(*shape, generator=generator, dtype=torch.float64)
    t[0] *= 1e-4  # a row whose norm is below eps = 1e-3: the clamp matters
    return t.requires_grad_()


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_cosine_logits_eps(device, backend, generator):
    x, p = _small_norm_rows(generator, 3, 5), _small_norm_rows(generator, 4, 5)
    want = 2.0 * F.normalize(x, dim=-1, eps=1e-3) @ F.normalize(p, dim=-1, eps=1e-3).T
    got = zslfast.cosine_logits(x, p, 2.0, eps=1e-3, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (x, p), g), torch.autograd.grad(want, (x, p), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite float > 0"):
            zslfast.cosine_logits(x, p, eps=bad, backend=backend)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_attribute_attention_eps(device, backend, generator):
    q = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    v = (torch.randn(2, 5, 6, generator=generator, dtype=torch.float64) * 1e-4).requires_grad_()
    ref = _small_norm_rows(generator, 4, 6)
    e = torch.softmax(q @ k.transpose(-1, -2) * 6 ** -0.5, dim=-1) @ v
    # max(|E|, eps) max(|ref|, eps), a clamped norm without derivative: F.normalize's form. F.cosine_similarity has
    # the same value, but its backward differs where |E| < eps, as here.
    want = (F.normalize(e, dim=-1, eps=1e-3) * F.normalize(ref.expand_as(e), dim=-1, eps=1e-3)).sum(-1)
    torch.testing.assert_close(want, F.cosine_similarity(e, ref.expand_as(e), dim=-1, eps=1e-3))
    got = zslfast.attribute_attention(q, k, v, ref, eps=1e-3, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    inputs = (q, k, v, ref)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_prototype_scores_backward_output_mask(device, backend, generator):
    e, s, w = (torch.randn(*shape, generator=generator) for shape in ((3, 5), (4, 5), (3, 4, 5)))
    grad = torch.randn(3, 4, generator=generator)
    for mask in ([True, True, True], [True, False, False], [False, True, True], [False, False, False]):
        torch.library.opcheck(torch.ops.zslfast.prototype_scores_backward.default, (grad, e, s, w, mask, backend))
        grads = torch.ops.zslfast.prototype_scores_backward(grad, e, s, w, mask, backend)
        for g, t, need in zip(grads, (e, s, w), mask):
            assert g.shape == (t.shape if need else (0,))

