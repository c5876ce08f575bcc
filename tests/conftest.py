"""Test-wide settings."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name)``: the module of ``benchmarks/<name>.py``, registered in ``sys.modules`` for
    the session (dataclasses look their module up there)."""
    loaded = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        loaded.append(name)
        spec.loader.exec_module(mod)
        return mod

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use small tensors: intra-op threads only add overhead, and on a shared 2-core machine
    two threads can be several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def private_calibration_cache(tmp_path_factory, monkeypatch):
    """Each test's default calibration cache (``$XDG_CACHE_HOME/steindiff/calibrations``) is its own empty
    folder: ``steindiff calibrate`` writes there, and nothing a test does reaches the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


class OutOfMemoryUnderGrad(torch.nn.Module):
    """Runs out of memory (as CUDA would) whenever its input carries a graph, i.e. in a stabilizer's
    Jacobian pass; a plain solver pass (``x -> x / 2``) works."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x, sigma):
        if x.requires_grad:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x * 0.5 * self.w


@pytest.fixture
def oom_under_grad():
    """A model that runs out of memory in every Jacobian pass (:class:`OutOfMemoryUnderGrad`)."""
    return OutOfMemoryUnderGrad()


@pytest.fixture
def oom_model_name(oom_under_grad, monkeypatch):
    """``test:oom-jacobian``, registered for this test only: a model name (for the command line) that
    loads :func:`oom_under_grad` on a VE process, with samples of shape ``(3,)``."""
    from steindiff.models import registry
    from steindiff.noise import VEProcess

    name = "test:oom-jacobian"
    spec = registry.ModelSpec(name, oom_under_grad, VEProcess(0.002, 80.0), (3,))
    monkeypatch.setattr(registry, "_LOADERS", [*registry._LOADERS, (lambda n: n == name, lambda n: spec)])
    return name


class ReadBacks(torch.overrides.TorchFunctionMode):
    """Counts the reads of tensor values into Python (``bool``, ``float``, ``int``, ``.item()``,
    ``.tolist()``) and the ``torch.tensor(..., device=...)`` copies from Python: on CUDA each one waits
    for the device (a host synchronisation).  Counted on any device, so CPU tests bound what a GPU waits for."""

    READS = {torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
             torch.Tensor.item, torch.Tensor.tolist}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS or (func is torch.tensor and kwargs.get("device") is not None):
            self.count += 1
        return func(*args, **kwargs)


@pytest.fixture
def read_backs():
    """:class:`ReadBacks`: ``with read_backs() as r: ...; r.count``."""
    return ReadBacks
