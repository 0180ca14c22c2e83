"""Package-level guarantees: what the core imports, and what importing tokenmerge does."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys, torch, tokenmerge
loaded_at_import = sorted(m for m in sys.modules if m.startswith("tokenmerge.strategies."))
model = torch.nn.Sequential(torch.nn.Linear(8, 8))
for name in tokenmerge.list_strategies():
    with tokenmerge.apply(model, name, ratio=0.5, adapter="generic", include=["0"], min_tokens=1):
        model(torch.randn(2, 64, 8))
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("diffusers", "timm", "transformers", "torchvision"))
print(json.dumps({"loaded_at_import": loaded_at_import, "heavy": heavy}))
"""


def _run() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_no_model_library_and_loads_plugins_lazily():
    result = _run()
    assert result["heavy"] == [], f"the core imported model libraries: {result['heavy']}"
    assert result["loaded_at_import"] == [], "built-in strategies must load on first use"
