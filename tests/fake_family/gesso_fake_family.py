"""A test-only family: deterministic "images" from the generator, no model weights.

It exercises the core end to end (discovery, config layers, CLI, metadata, ``--from``) in
milliseconds. Its checkpoint is a folder with a ``model_index.json`` naming ``FakeTextToImagePipeline``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from gesso import hookimpl
from gesso.contract import ModelFamily
from gesso.images import postprocess
from gesso.pipeline import PipelineOutput
from gesso.pipeline_loading import DiffusionPipeline


class FakeTextToImagePipeline(DiffusionPipeline):
    family = "fake"
    default_num_inference_steps = 3
    default_guidance_scale = 2.0

    def __call__(
        self,
        prompt=None,
        height=None,
        width=None,
        num_inference_steps=None,
        guidance_scale=None,
        negative_prompt=None,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        return_dict=True,
        brightness=0.5,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = height or 16, width or 16
        images = []
        for text in prompts:
            digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32
            for _ in range(num_images_per_prompt):
                noise = torch.rand((3, height, width), generator=generator)
                images.append((noise * brightness + digest * (1 - brightness)) * 2 - 1)
        batch = torch.stack(images)
        return PipelineOutput(images=postprocess(batch, output_type))


def write_checkpoint(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FakeTextToImagePipeline"}))
    return folder


@hookimpl
def register_families(register):
    register(
        ModelFamily(
            name="fake",
            pipeline=FakeTextToImagePipeline,
            pipeline_class_names=("FakeTextToImagePipeline",),
            description="test-only family",
            config_defaults={"num_inference_steps": 3, "guidance_scale": 2.0},
            config_keys={"brightness": 0.5},
            tiny_checkpoint=write_checkpoint,
        )
    )
