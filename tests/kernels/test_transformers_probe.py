"""Our top-level `kernels` package must not look like the PyPI `kernels` that transformers probes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("hide_metadata", [False, True])
def test_transformers_does_not_take_us_for_hf_kernels(hide_metadata):
    # A fresh interpreter: transformers caches the probe, and nothing of ours may be imported first.
    # hide_metadata: as on a machine where the repo is on sys.path but not pip-installed; transformers
    # then imports the package and reads its __version__ (which it must not find).
    code = textwrap.dedent(f"""
        import importlib.metadata, importlib.util, sys, torch
        if {hide_metadata}:
            real_version = importlib.metadata.version
            def version(name):
                if name in ("kernels", "kvmesh"):
                    raise importlib.metadata.PackageNotFoundError(name)
                return real_version(name)
            importlib.metadata.version = version
        assert importlib.util.find_spec("kernels") is not None, "our kernels package must be importable"
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils.import_utils import is_kernels_available
        assert is_kernels_available() is False
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            logits = model(torch.randint(0, 64, (1, 10))).logits
        assert logits.shape == (1, 10, 64) and torch.isfinite(logits).all()
        ours = [m for m in sys.modules if m.startswith("kernels.")]
        assert not ours, f"transformers' probe imported our kernel modules {{ours}}"
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_kernels_package_import_is_light():
    code = "import sys, kernels; assert 'triton' not in sys.modules and 'torch' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
