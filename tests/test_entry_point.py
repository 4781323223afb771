"""backend="memopt" resolves through the torch_dynamo_backends entry point."""

from __future__ import annotations

import subprocess
import sys


def test_backend_listed_without_importing_memopt():
    code = (
        "import sys, torch\n"
        "listed = 'memopt' in torch._dynamo.list_backends()\n"
        "print(listed, 'memopt' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


def test_backend_string_compiles_without_import():
    code = (
        "import torch\n"
        "m = torch.nn.Linear(3, 2)\n"
        "c = torch.compile(m, backend='memopt', options={'codegen': 'eager'})\n"
        "x = torch.randn(4, 3)\n"
        "torch.testing.assert_close(c(x), m(x))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok", out.stderr
