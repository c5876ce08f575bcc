"""Our code does not make torch warn: forward-mode Jacobian products in a fresh process (where torch
loads its decompositions, with a torch.jit.script deprecation) run clean under -W error.

(Warnings raised from steindiff.* itself are errors in every test: pyproject's filterwarnings.)"""

import subprocess
import sys
from pathlib import Path

import pytest

SETUP = "import torch\nx = torch.randn(2, 3, dtype=torch.float64)\n"
CASES = {
    "diagnose": "from steindiff.diagnostics.lipschitz import local_lipschitz\n"
                "L = local_lipschitz(lambda z: 2 * z, x, iters=2, jvp='forward')\n"
                "assert torch.allclose(L, torch.full((2,), 2.0, dtype=torch.float64))\n",
    "stein-jvp": "from steindiff.stabilizers.divergence import jvp_quadratic_forms\n"
                 "assert jvp_quadratic_forms(lambda z: 2 * z, x, torch.randn(1, 2, 3, dtype=torch.float64)).shape == (1, 2)\n",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_mode_raises_no_deprecation_warning(case):
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", SETUP + CASES[case]],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
