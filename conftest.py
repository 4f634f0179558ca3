"""Test-session settings for the whole repository: no network, one CPU thread per process.

Tiny test models are dominated by per-operator overhead, where a second intra-op thread only adds
synchronisation (on a busy 2-core machine, a hundredfold slowdown was measured); subprocesses the
tests start inherit the same settings.
"""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if "GESSO_COMPILE_CACHE" not in os.environ:  # compiled blocks go to a session folder, not the user's cache
    os.environ["GESSO_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="gesso-compile-cache-")
    atexit.register(shutil.rmtree, os.environ["GESSO_COMPILE_CACHE"], True)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """GPU tests run on the GPU machine (``pytest -m gpu``); without CUDA they are deselected."""
    if torch.cuda.is_available():
        return
    selected = [item for item in items if "gpu" not in item.keywords]
    if len(selected) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "gpu" in item.keywords])
        items[:] = selected
