"""The gesso command line, end to end, on the test-only fake family."""

from __future__ import annotations

import json

import numpy as np
from gesso.testing import assert_same_image
from PIL import Image


def test_generate_writes_png_with_both_metadata_chunks(cli, fake_checkpoint, tmp_path):
    result = cli("generate", "a red fox, at dusk", "--model", str(fake_checkpoint), "--out", "out", "seed=7", "negative_prompt=blurry")
    assert result.returncode == 0, result.stderr
    png = tmp_path / "out" / "00000.png"
    assert result.stdout.strip() == str(png.relative_to(tmp_path))
    with Image.open(png) as image:
        text = dict(image.text)
    lines = text["parameters"].splitlines()
    assert lines[0] == "a red fox, at dusk"
    assert lines[1] == "Negative prompt: blurry"
    assert "Steps: 3" in lines[2] and "CFG scale: 2.0" in lines[2] and "Seed: 7" in lines[2] and "Size: 16x16" in lines[2]
    assert "prompt: a red fox, at dusk" in text["gesso"]
    assert (tmp_path / "out" / "00000.yaml").read_text() == text["gesso"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_run_from_image_reproduces_pixels(cli, fake_checkpoint, tmp_path):
    first = cli("generate", "a lighthouse", "--model", str(fake_checkpoint), "--out", "a", "num_images_per_prompt=2", "brightness=0.8")
    assert first.returncode == 0, first.stderr
    again = cli("run", "--from", "a/00001.png", "--out", "b")
    assert again.returncode == 0, again.stderr
    assert_same_image(Image.open(tmp_path / "a" / "00001.png"), Image.open(tmp_path / "b" / "00001.png"))
    assert_same_image(Image.open(tmp_path / "a" / "00000.png"), Image.open(tmp_path / "b" / "00000.png"))


def test_random_seed_is_recorded_and_runs_never_overwrite(cli, fake_checkpoint, tmp_path):
    for _ in range(2):
        assert cli("generate", "same prompt", "--model", str(fake_checkpoint), "--out", "o").returncode == 0
    seeds = [Image.open(tmp_path / "o" / f"0000{i}.png").text["gesso"] for i in range(2)]
    assert all("seed: " in s and "seed: null" not in s for s in seeds)


def test_cli_and_python_api_give_the_same_image(cli, fake_checkpoint, tmp_path, plugin_host):
    import sys

    from tests.conftest import FAKE_FAMILY_DIR

    sys.path.insert(0, str(FAKE_FAMILY_DIR))
    import gesso
    import gesso_fake_family

    plugin_host(gesso_fake_family)
    result = gesso.run({"model": str(fake_checkpoint), "prompt": "a boat", "seed": 11, "output": {"dir": str(tmp_path / "py")}})
    assert cli("generate", "a boat", "--model", str(fake_checkpoint), "--out", "cli", "seed=11").returncode == 0
    assert_same_image(result.images[0], Image.open(tmp_path / "cli" / "00000.png"))


def test_plugins_json_reports_a_broken_plugin_and_exits_zero(cli, tmp_path):
    from gesso.testing import write_distribution

    broken = write_distribution(tmp_path / "broken-site", "gesso-broken", {"broken": "gesso_definitely_missing_module"})
    result = cli("plugins", "--json", extra_path=broken)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert any(f["name"] == "broken" and f["stage"] == "import" for f in report["failures"])
    assert any(p["name"] == "fake" and "fake" in p["registers"]["families"] for p in report["plugins"])
    text = cli("plugins", extra_path=broken)
    assert "FAILED broken" in text.stdout and text.returncode == 0


def test_misspelt_key_is_refused_with_the_likely_key(cli, fake_checkpoint):
    result = cli("generate", "x", "--model", str(fake_checkpoint), "num_inference_step=4")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "'num_inference_step'" in result.stderr and "did you mean 'num_inference_steps'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_values_get_one_line_naming_the_key(cli, fake_checkpoint, tmp_path):
    cases = {
        ("height=65",): "height: must be a multiple of 8",
        ("scheduler=eulr",): "did you mean 'euler'",
        ("dtype=float8",): "dtype: must be one of",
        ("output.dri=x",): "did you mean 'dir'",
    }
    for overrides, message in cases.items():
        result = cli("generate", "x", "--model", str(fake_checkpoint), *overrides)
        assert result.returncode == 2, (overrides, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    missing = cli("generate", "x", "--model", str(tmp_path / "no" / "such" / "model"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    offline = cli("generate", "x", "--model", "someone/not-cached-anywhere")
    assert offline.returncode == 2 and "not in the local cache" in offline.stderr


def test_run_config_file_layers_and_config_show(cli, fake_checkpoint, tmp_path):
    (tmp_path / "run.yaml").write_text(f"model: {fake_checkpoint}\nprompt: from the file\nbrightness: 0.25\nheight: 24\n")
    shown = cli("config", "show", "run.yaml", "height=32")
    assert shown.returncode == 0, shown.stderr
    assert "brightness: 0.25" in shown.stdout  # user YAML over the family's default (0.5)
    assert "height: 32" in shown.stdout  # the command line over the YAML
    assert "num_inference_steps: 3" in shown.stdout  # the family's default over the core's (None)
    assert "family: fake" in shown.stdout
    result = cli("run", "run.yaml", "seed=3", "--out", "r")
    assert result.returncode == 0, result.stderr
    assert np.asarray(Image.open(tmp_path / "r" / "00000.png")).shape == (24, 16, 3)


def test_bad_yaml_file_and_missing_config_file(cli, tmp_path):
    (tmp_path / "bad.yaml").write_text("prompt: [unclosed\n")
    result = cli("run", "bad.yaml")
    assert result.returncode == 2 and "bad.yaml" in result.stderr and "Traceback" not in result.stderr
    result = cli("run", "absent.yaml")
    assert result.returncode == 2 and "absent.yaml does not exist" in result.stderr
    result = cli("run", "--from", "absent.png")
    assert result.returncode == 2 and "absent.png does not exist" in result.stderr


def test_sd15_cli_and_python_api_give_the_same_image(cli, tiny_checkpoint, tmp_path):
    """A real family end to end: ``gesso generate ... seed=N`` equals the pipeline called with
    ``torch.Generator("cpu").manual_seed(N)``, and ``gesso run --from`` reproduces it."""
    import torch
    from gesso import AutoPipelineForText2Image

    folder = tiny_checkpoint("sd15")
    result = cli("generate", "a red fox", "--model", str(folder), "--out", "sd", "seed=21", "num_inference_steps=3", "scheduler=euler_a")
    assert result.returncode == 0, result.stderr
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    from gesso.plugins import get_host

    pipeline.scheduler = get_host().registry.make_scheduler("euler_a", pipeline.scheduler.config)
    expected = pipeline("a red fox", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(21)).images[0]
    written = Image.open(tmp_path / "sd" / "00000.png")
    assert_same_image(written, expected)
    assert "Sampler: Euler a" in written.text["parameters"]
    replay = cli("run", "--from", "sd/00000.png", "--out", "again")
    assert replay.returncode == 0, replay.stderr
    assert_same_image(Image.open(tmp_path / "again" / "00000.png"), written)
