"""The Ray engine of ``gesso batch``: one local Ray (2 CPU workers) for the module; the same images as the local engine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from gesso.testing import assert_same_image, write_distribution
from PIL import Image

from tests.conftest import FAKE_FAMILY_DIR

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray with 2 CPUs whose workers see the fake family (as an installed plugin would be)."""
    site = write_distribution(tmp_path_factory.mktemp("ray-site"), "gesso-fake-family", {"fake": "gesso_fake_family"})
    python_path = os.pathsep.join([str(site), str(FAKE_FAMILY_DIR), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": python_path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture
def fake(plugin_host):
    sys.path.insert(0, str(FAKE_FAMILY_DIR))
    import gesso_fake_family

    sys.path.remove(str(FAKE_FAMILY_DIR))
    return plugin_host(gesso_fake_family)


def records(folder: Path) -> dict[int, dict]:
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    found = {}
    for line in lines:
        record = json.loads(line)
        assert record["index"] not in found, "two records for one image"
        found[record["index"]] = record
    return found


def assert_same_job(local: Path, remote: Path, count: int) -> None:
    """Pixel-equal images and, but for the output folder, the same replayable config in each."""
    for index in range(count):
        with Image.open(local / f"{index:05d}.png") as a, Image.open(remote / f"{index:05d}.png") as b:
            assert_same_image(a, b)
            assert a.text["gesso"].replace(f"dir: {local}", "") == b.text["gesso"].replace(f"dir: {remote}", "")
            assert a.text["parameters"] == b.text["parameters"]


def test_ray_two_workers_match_the_local_engine(ray_session, fake, fake_checkpoint, tmp_path):
    import gesso

    items = [f"prompt {i}" for i in range(7)] + [{"prompt": "darker", "brightness": 0.1}, {"prompt": "bad", "brightnes": 0.1}]
    options = {"model": str(fake_checkpoint), "overrides": ["seed=11"]}
    local = gesso.batch(items, tmp_path / "local", **options)
    remote = gesso.batch(items, tmp_path / "ray", engine="ray", workers=2, batch_size=2, **options)
    assert local.exit_code == remote.exit_code == 1 and local.failed == remote.failed == [8]
    assert sorted(remote.written) == list(range(8))
    assert sorted(records(tmp_path / "ray")) == list(range(8))
    assert_same_job(tmp_path / "local", tmp_path / "ray", 8)
    error = json.loads((tmp_path / "ray" / "errors.jsonl").read_text())
    assert error["index"] == 8 and "did you mean 'brightness'" in error["error"]
    # a resume on Ray makes nothing twice
    again = gesso.batch(items, tmp_path / "ray", engine="ray", workers=2, batch_size=2, **options)
    assert again.written == [] and sorted(again.skipped) == list(range(8)) and len(records(tmp_path / "ray")) == 8


def test_tiny_sd15_on_ray_equals_local_and_gesso_run(ray_session, tiny_checkpoint, tmp_path, plugin_host):
    import gesso

    plugin_host(entry_points=True)
    checkpoint = tiny_checkpoint("sd15")
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    overrides = ["seed=5", "num_inference_steps=2", "height=32", "width=32"]
    local = gesso.batch(prompts, tmp_path / "local", model=str(checkpoint), overrides=overrides)
    remote = gesso.batch(prompts, tmp_path / "ray", model=str(checkpoint), overrides=overrides, engine="ray", workers=2, batch_size=1)
    assert local.exit_code == remote.exit_code == 0 and sorted(remote.written) == [0, 1, 2]
    assert_same_job(tmp_path / "local", tmp_path / "ray", 3)
    with pytest.raises(AssertionError):  # a real image per item, not one image three times
        assert_same_image(Image.open(tmp_path / "ray" / "00000.png"), Image.open(tmp_path / "ray" / "00001.png"))
    single = gesso.run(
        {"model": str(checkpoint), "prompt": "a green cone", "seed": 7, "num_inference_steps": 2, "height": 32, "width": 32}, write=False
    )
    assert_same_image(single.images[0], Image.open(tmp_path / "ray" / "00002.png"))


def test_scaling_script_reports_throughput_and_efficiency(ray_session, fake, fake_checkpoint, tmp_path):
    """benchmarks/scaling.py on CPU workers: one job per worker count, every image made, an efficiency per row."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import scaling
    finally:
        sys.path.pop(0)
    results = scaling.main(
        [
            "--families",
            "fake",
            "--model",
            str(fake_checkpoint),
            "--device",
            "cpu",
            "--gpus",
            "1",
            "2",
            "--items-per-gpu",
            "3",
            "--scratch",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    rows = results[0]["rows"]
    assert [row["workers"] for row in rows] == [1, 2]
    assert [row["images"] for row in rows] == [3, 6] and all(row["failed"] == 0 for row in rows)
    assert rows[0]["efficiency"] == 1.0
    assert json.loads((tmp_path / "r" / "scaling.json").read_text())["results"][0]["family"] == "fake"
    assert sorted(p.name for p in (tmp_path / "s" / "fake-2").glob("*.png")) == [f"{i:05d}.png" for i in range(6)]
