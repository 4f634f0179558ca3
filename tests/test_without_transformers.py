"""Loading and running a pipeline imports neither transformers nor the compiler (seconds of every
new process).

gesso reads the CLIP text and vision encoders, tokenizer, image processor and the SD safety checker
with its own classes. The checkpoints are written here, in the test process (their writers may use
transformers); a fresh process then loads each through ``AutoPipelineForText2Image`` and makes an
image, and reports which of the heavy modules it imported: transformers and tokenizers, and
``torch._dynamo`` and sympy, which building a model on the meta device pulled in through random
initialisation of ``nn.Embedding`` (gesso's models skip that, see ``gesso.nn.embeddings.embedding``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import PIL.Image, torch
from gesso import AutoPipelineForText2Image, ControlNetModel

results = {}
for name, folder, controlnet in json.loads(sys.argv[1]):
    extra = {"controlnet": ControlNetModel.from_pretrained(controlnet)} if controlnet else {}
    pipeline = AutoPipelineForText2Image.from_pretrained(folder, **extra)
    call = {"image": PIL.Image.new("RGB", (32, 32), (200, 30, 30))} if controlnet else {}
    out = pipeline("a red fox", num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0), **call)
    results[name] = {
        "images": list(out.images.shape),
        "checked": getattr(out, "nsfw_content_detected", None) is not None,
        "classes": {key: f"{type(value).__module__}.{type(value).__name__}" for key, value in pipeline.components.items() if value is not None},
        "imported": [module for module in ("transformers", "tokenizers", "torch._dynamo", "sympy") if module in sys.modules],
    }
print(json.dumps(results))
"""


@pytest.fixture
def checkpoints(plugin_host, tiny_checkpoint, tmp_path):
    from gesso_controlnet.tiny import write_tiny_controlnet

    plugin_host(entry_points=True)
    sd15 = str(tiny_checkpoint("sd15", safety_checker=True))
    return [
        ("sd15", sd15, None),
        ("sd15 + controlnet", sd15, str(write_tiny_controlnet(tmp_path / "controlnet"))),
        ("sdxl", str(tiny_checkpoint("sdxl")), None),
        ("kandinsky", str(tiny_checkpoint("kandinsky")), None),
    ]


def test_loading_and_generating_imports_no_transformers_and_no_compiler(checkpoints):
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(checkpoints)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(results) == [name for name, _, _ in checkpoints]
    for name, result in results.items():
        assert result["imported"] == [], f"{name}: imported {result['imported']}"
        assert result["images"][0] == 1, name
        clip_parts = {key: cls for key, cls in result["classes"].items() if cls.rpartition(".")[2].startswith("CLIP")}
        assert clip_parts and all(cls.startswith("gesso.clip.") for cls in clip_parts.values()), f"{name}: {clip_parts}"
    sd15 = results["sd15"]
    assert sd15["checked"] and sd15["classes"]["safety_checker"] == "gesso_sd15.safety_checker.StableDiffusionSafetyChecker"
    assert sd15["classes"]["feature_extractor"] == "gesso.clip.image_processor.CLIPImageProcessor"
    assert results["kandinsky"]["classes"]["prior_image_encoder"] == "gesso.clip.models.CLIPVisionModelWithProjection"
