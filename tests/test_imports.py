"""Every kdlab module imports first, in a fresh kdlab state: an import cycle shows only for some entry points."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import kdlab
names = sorted(m.name for m in pkgutil.walk_packages(kdlab.__path__, "kdlab.") if not m.name.startswith("kdlab.recipes") and m.name != "kdlab.__main__")
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k == "kdlab" or k.startswith("kdlab.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print(len(names))
print("\n".join(failed))
"""


def test_every_module_imports_on_its_own():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    count, *failed = proc.stdout.strip().splitlines()
    assert int(count) > 40
    assert not [f for f in failed if f], failed
