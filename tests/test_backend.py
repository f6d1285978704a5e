"""Backend choice (zslfast/_backend.py) and the import-time behaviour of the compiled extension."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zslfast
from zslfast import _backend


def test_extension_present_when_required():
    """CI sets ZSLFAST_REQUIRE_EXTENSION=1 (and ZSLFAST_REQUIRE_CUDA_KERNELS=1 where it builds the CUDA sources):
    a build that silently failed would otherwise only show up as skipped tests."""
    if os.environ.get("ZSLFAST_REQUIRE_EXTENSION") == "1":
        assert _backend.HAS_EXTENSION, _backend.EXTENSION_ERROR
    if os.environ.get("ZSLFAST_REQUIRE_CUDA_KERNELS") == "1":
        assert _backend.HAS_CUDA_KERNELS, "zslfast._C was built without its CUDA kernels"
        assert torch.ops.zslfast._prototype_scores_fwd.default.has_kernel_for_dispatch_key("CUDA")
    if not _backend.HAS_EXTENSION:
        pytest.skip(_backend.EXTENSION_ERROR)


def test_default_backend_by_device(monkeypatch):
    monkeypatch.delenv("ZSLFAST_BACKEND", raising=False)
    expected = "cpu" if _backend.HAS_EXTENSION else "reference"
    assert _backend.resolve("op", None, torch.device("cpu")) == expected
    if torch.cuda.is_available():
        assert _backend.resolve("op", None, torch.device("cuda")) in ("triton", "cuda")


def test_environment_overrides_default(monkeypatch):
    monkeypatch.setenv("ZSLFAST_BACKEND", "reference")
    assert _backend.resolve("op", None, torch.device("cpu")) == "reference"
    assert _backend.resolve("op", "cpu" if _backend.HAS_EXTENSION else "reference", torch.device("cpu")) != "triton"
    monkeypatch.setenv("ZSLFAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="ZSLFAST_BACKEND='gpu'"):
        _backend.resolve("op", None, torch.device("cpu"))


def test_environment_backend_reaches_the_ops(monkeypatch):
    """ZSLFAST_BACKEND=reference makes the public op run the reference: visible in the autograd graph."""
    e, s, w = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3), torch.randn(2, 4, 3)
    monkeypatch.setenv("ZSLFAST_BACKEND", "reference")
    assert type(zslfast.prototype_scores(e, s, w).grad_fn).__name__ == "SumBackward1"
    monkeypatch.delenv("ZSLFAST_BACKEND")
    if _backend.HAS_EXTENSION:
        assert "zslfast_prototype_scores" in type(zslfast.prototype_scores(e, s, w).grad_fn).__name__


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(ValueError, match="backend must be None or one of"):
        _backend.resolve("op", "metal", torch.device("cpu"))
    with pytest.raises(_backend.BackendUnavailableError, match="CUDA tensors"):
        _backend.resolve("op", "cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.HAS_TRITON:
        with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            _backend.resolve("op", "triton", torch.device("cpu"))
    if torch.cuda.is_available():
        with pytest.raises(_backend.BackendUnavailableError, match="CPU tensors"):
            _backend.resolve("op", "cpu", torch.device("cuda"))


def test_available_backends_lists_what_runs():
    names = zslfast.available_backends("cpu")
    assert names[0] == "reference"
    assert ("cpu" in names) == _backend.HAS_EXTENSION
    assert "cuda" not in names


def _run_python(code):
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_mismatched_extension_warns_once_and_falls_back():
    """An extension built against another torch is not loaded: one warning, the ops run the reference."""
    result = _run_python(
        """
        import sys, types, warnings, torch
        fake = types.ModuleType("zslfast._build_info")
        fake.TORCH_VERSION, fake.TORCH_CUDA_VERSION, fake.WITH_CUDA, fake.CUDA_ARCH_LIST = "1.0.0", None, False, None
        sys.modules["zslfast._build_info"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import zslfast
        messages = [str(w.message) for w in caught if "zslfast" in str(w.message)]
        assert len(messages) == 1 and "built against torch 1.0.0" in messages[0], messages
        e, s, w = torch.randn(2, 3), torch.randn(4, 3), torch.randn(2, 4, 3)
        torch.testing.assert_close(zslfast.prototype_scores(e, s, w), zslfast.reference.prototype_scores(e, s, w))
        try:
            zslfast.prototype_scores(e, s, w, backend="cpu")
        except zslfast.BackendUnavailableError as err:
            assert "rebuild" in str(err), err
        else:
            raise AssertionError("backend='cpu' ran without its extension")
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_missing_extension_does_not_break_import():
    result = _run_python(
        """
        import sys, torch
        sys.modules["zslfast._build_info"] = None  # as if never built
        import zslfast
        assert not zslfast._backend.HAS_EXTENSION and "not built" in zslfast._backend.EXTENSION_ERROR
        print(zslfast.prototype_scores(torch.randn(2, 3), torch.randn(4, 3)).shape)
        """
    )
    assert result.returncode == 0 and "torch.Size([2, 4])" in result.stdout, result.stderr
    assert "falls back to its PyTorch reference" in result.stderr


def test_commands_say_when_the_extension_is_missing():
    """python -m zslfast prints a banner naming the import error when zslfast._C is not in use."""
    result = _run_python(
        """
        import sys
        sys.modules["zslfast._build_info"] = None  # as if never built
        from zslfast.__main__ import main
        main([])
        """
    )
    assert result.returncode == 0, result.stderr
    assert "compiled extension is NOT in use: zslfast._C is not built" in result.stderr


@pytest.mark.parametrize(
    "triton_version, numpy_version, need",
    [("3.6.0", "2.5.5", "numpy<2.4"), ("3.8.0", "2.4.0", "numpy<2.4"), ("3.0.0", "2.1.3", "numpy<2"),
     ("3.0.0", "1.26.4", None), ("3.6.0", "2.3.5", None), ("3.9.0", "2.5.5", None)],
)
def test_interpreter_numpy_pairs(monkeypatch, triton_version, numpy_version, need):
    """The Triton interpreter pairs that fail or compute zeros are refused, naming the numpy to install."""
    triton = pytest.importorskip("triton")
    import numpy

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = _backend._interpreter_numpy_problem()
    if need is None:
        assert problem is None
    else:
        assert f"install {need}" in problem and triton_version in problem and numpy_version in problem


def test_environment_is_read_outside_compile_only(monkeypatch):
    """Inside a compiled region the dispatch uses the value of the last eager read (torch 2.4's dynamo cannot trace
    os.environ); outside, every call reads the environment afresh."""
    monkeypatch.setenv("ZSLFAST_BACKEND", "reference")
    assert _backend.environ("ZSLFAST_BACKEND") == "reference"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setenv("ZSLFAST_BACKEND", "cpu")
    assert _backend.environ("ZSLFAST_BACKEND") == "reference"
