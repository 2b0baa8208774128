"""Run Python code in a fresh interpreter where importing torch fails (the edge scorer's promise)."""

import os
import subprocess
import sys
import textwrap

# A meta-path hook that makes every import of torch (and torchvision) fail, installed before the code
# runs; the code can then prove that nothing it imported pulled torch in.
BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"torch is blocked in this test (import of {name})")
            return None

    sys.meta_path.insert(0, _NoTorch())
    for mod in [m for m in sys.modules if m.split(".")[0] == "torch"]:
        del sys.modules[mod]
""")


def run_without_torch(code: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` (dedented) after the block, with ``args`` as sys.argv[1:], on this process's import path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
