"""Batch generation (``gesso batch`` / ``gesso.batch``) on the test-only fake family, local engine."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gesso.testing import assert_same_image, write_distribution
from PIL import Image

from tests.conftest import FAKE_FAMILY_DIR

#: A family that is the fake family plus a pause per image, so a job can be killed half-way.
SLOW_FAMILY = """
import json, time
from pathlib import Path
from gesso import hookimpl
from gesso.contract import ModelFamily
from gesso_fake_family import FakeTextToImagePipeline

class SlowTextToImagePipeline(FakeTextToImagePipeline):
    family = "slow"
    def __call__(self, *args, **kwargs):
        time.sleep(0.2)
        return super().__call__(*args, **kwargs)

@hookimpl
def register_families(register):
    register(ModelFamily(name="slow", pipeline=SlowTextToImagePipeline, pipeline_class_names=("SlowTextToImagePipeline",),
                         config_defaults={"num_inference_steps": 3, "guidance_scale": 2.0}, config_keys={"brightness": 0.5}))
"""


@pytest.fixture
def fake(plugin_host):
    """The fake family registered in this process (for ``gesso.batch`` and ``gesso.run`` in-process)."""
    sys.path.insert(0, str(FAKE_FAMILY_DIR))
    import gesso_fake_family

    sys.path.remove(str(FAKE_FAMILY_DIR))
    return plugin_host(gesso_fake_family)


@pytest.fixture
def gesso_cli(fake, tmp_path, monkeypatch, capsys):
    """``gesso`` in this process (in ``tmp_path``, the fake family registered): (exit status, stderr)."""
    from gesso.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr().err

    return run


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def errors(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "errors.jsonl").read_text().splitlines()]


def assert_exactly_once(folder: Path, count: int) -> None:
    """One record per image, each naming an existing file with its sha256, and no temporary files."""
    records = manifest(folder)
    assert sorted(r["index"] for r in records) == list(range(count))
    for record in records:
        assert record["file"] == f"{record['index']:05d}.png"
        assert hashlib.sha256((folder / record["file"]).read_bytes()).hexdigest() == record["sha256"]
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(count)]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] in ([], [".lock"])


def test_cli_batch_writes_indexed_images_with_replayable_metadata(cli, gesso_cli, fake_checkpoint, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\n\na blue whale\na green frog\n")
    result = cli("batch", "--model", str(fake_checkpoint), "--prompts", "prompts.txt", "--out", "out", "seed=100", "brightness=0.7")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert_exactly_once(out, 3)
    records = manifest(out)
    assert [(r["prompt"], r["seed"], r["overrides"]) for r in records] == [
        ("a red fox", 100, {}),
        ("a blue whale", 101, {}),
        ("a green frog", 102, {}),
    ]
    assert "3 written" in result.stderr and "images/s" in result.stderr
    assert "%|" not in result.stderr  # no progress bar when stderr is not a terminal
    with Image.open(out / "00002.png") as image:
        text = dict(image.text)
    assert text["parameters"].splitlines()[0] == "a green frog" and "Seed: 102" in text["parameters"]
    assert "seed: 102" in text["gesso"] and "brightness: 0.7" in text["gesso"] and "num_images_per_prompt: 1" in text["gesso"]
    # gesso run --from replays item 2 exactly; a rerun of the job makes nothing again
    assert gesso_cli("run", "--from", "out/00002.png", "--out", "replay")[0] == 0
    assert_same_image(Image.open(out / "00002.png"), Image.open(tmp_path / "replay" / "00000.png"))
    code, stderr = gesso_cli(
        "batch", "--model", str(fake_checkpoint), "--prompts", "prompts.txt", "--out", "out", "seed=100", "brightness=0.7"
    )
    assert code == 0 and "0 written, 3 already done" in stderr
    assert len(manifest(out)) == 3


def test_jsonl_overrides_and_bad_items_are_recorded_while_the_job_goes_on(gesso_cli, fake_checkpoint, tmp_path):
    lines = [
        {"prompt": "bright", "brightness": 0.9},
        {"prompt": "misspelt", "num_inference_step": 2},
        {"prompt": "not a number", "brightness": float("nan")},
        "this line is not JSON",
        {"prompt": "taller", "height": 24},
        {"no_prompt": 1},
        {"prompt": "plain"},
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    code, stderr = gesso_cli("batch", "--model", str(fake_checkpoint), "--prompts", "items.jsonl", "--out", "out", "seed=7")
    assert code == 1, stderr
    out = tmp_path / "out"
    assert sorted(r["index"] for r in manifest(out)) == [0, 4, 6]
    failed = {e["index"]: e["error"] for e in errors(out)}
    assert sorted(failed) == [1, 2, 3, 5]
    assert "did you mean 'num_inference_steps'" in failed[1]
    assert "NaN" in failed[2]
    assert "JSON" in failed[3] and "prompt" in failed[5]
    assert "3 written" in stderr and "4 failed" in stderr and "errors.jsonl" in stderr
    assert Image.open(out / "00004.png").size == (16, 24)
    # the override is in the item's replayable config; a rerun retries only the failed items
    assert gesso_cli("run", "--from", "out/00000.png", "--out", "replay")[0] == 0
    assert_same_image(Image.open(out / "00000.png"), Image.open(tmp_path / "replay" / "00000.png"))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    code, stderr = gesso_cli("batch", "--model", str(fake_checkpoint), "--prompts", "items.jsonl", "--out", "out", "seed=7")
    assert code == 1 and "0 written, 3 already done, 4 failed" in stderr
    assert sorted(e["index"] for e in errors(out)) == [1, 2, 3, 5]  # the latest run's failures, once each
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before


def test_python_api_matches_gesso_run_with_seed_plus_index(fake, fake_checkpoint, tmp_path):
    import gesso

    result = gesso.batch(
        ["one", {"prompt": "two", "brightness": 0.2}, "three"], tmp_path / "b", model=str(fake_checkpoint), overrides=["seed=40"]
    )
    assert result.exit_code == 0 and result.written == [0, 1, 2]
    for index, (prompt, extra) in enumerate([("one", {}), ("two", {"brightness": 0.2}), ("three", {})]):
        single = gesso.run({"model": str(fake_checkpoint), "prompt": prompt, "seed": 40 + index, **extra}, write=False)
        assert_same_image(single.images[0], Image.open(tmp_path / "b" / f"{index:05d}.png"))
    assert_same_image(
        Image.open(tmp_path / "b" / "00000.png"),
        gesso.run({"model": str(fake_checkpoint), "prompt": "one", "seed": 40}, write=False).images[0],
    )
    with pytest.raises(AssertionError):  # and seeds really differ per item
        assert_same_image(
            Image.open(tmp_path / "b" / "00000.png"),
            gesso.run({"model": str(fake_checkpoint), "prompt": "one", "seed": 41}, write=False).images[0],
        )


def test_chosen_seed_is_kept_for_the_resume_and_a_different_job_is_refused(fake, fake_checkpoint, tmp_path):
    import gesso
    from gesso.batching.manifest import BatchError

    out = tmp_path / "b"
    first = gesso.batch(["a", "b", "c"], out, model=str(fake_checkpoint))
    job = json.loads((out / "job.json").read_text())
    assert job["seed"] == first.seed and [r["seed"] for r in manifest(out)] == [first.seed, first.seed + 1, first.seed + 2]
    original = (out / "00001.png").read_bytes()
    (out / "00001.png").unlink()
    resumed = gesso.batch(["a", "b", "c"], out, model=str(fake_checkpoint))
    assert resumed.seed == first.seed and resumed.written == [1] and resumed.skipped == [0, 2]
    assert (out / "00001.png").read_bytes() == original  # the same seed again: byte-identical
    assert_exactly_once(out, 3)
    with pytest.raises(BatchError, match="seed="):
        gesso.batch(["a", "b", "c"], out, model=str(fake_checkpoint), overrides=[f"seed={first.seed + 1}"])
    with pytest.raises(BatchError, match="different config"):
        gesso.batch(["a", "b", "c"], out, model=str(fake_checkpoint), overrides=["brightness=0.1"])
    with pytest.raises(BatchError, match="item 1 differs"):
        gesso.batch(["a", "B", "c"], out, model=str(fake_checkpoint))


def test_torn_line_duplicates_orphans_and_temporary_files_are_repaired(fake, fake_checkpoint, tmp_path):
    import gesso

    out = tmp_path / "b"
    prompts = [f"prompt {i}" for i in range(5)]
    gesso.batch(prompts, out, model=str(fake_checkpoint), overrides=["seed=3"])
    records = manifest(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "00000.png").unlink()  # a record whose file is gone: made again
    lines = [json.dumps(r) for r in records if r["index"] != 3]  # 00003.png renamed but never recorded (killed in between)
    lines.insert(2, json.dumps(records[1]))  # a duplicate
    (out / "manifest.jsonl").write_text("\n".join(lines) + '\n{"index": 4, "file": "000')  # torn by a kill mid-append
    (out / ".00004.x1y2.tmp").write_bytes(b"\x89PNG half")  # a kill during an image write
    result = gesso.batch(prompts, out, model=str(fake_checkpoint), overrides=["seed=3"])
    assert result.exit_code == 0 and result.written == [0] and sorted(result.skipped) == [1, 2, 3, 4]
    assert_exactly_once(out, 5)
    assert len(manifest(out)) == 5
    assert {k: v for k, v in stamps.items() if k != "00000.png"} == {
        p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name != "00000.png"
    }
    assert next(r for r in manifest(out) if r["index"] == 0)["sha256"] == records[0]["sha256"]
    with open(out / "manifest.jsonl", "a") as stream:  # a whole duplicate line alone is dropped too
        stream.write(json.dumps(records[2]) + "\n")
    assert gesso.batch(prompts, out, model=str(fake_checkpoint), overrides=["seed=3"]).written == []
    assert_exactly_once(out, 5)
    assert len(manifest(out)) == 5


def test_kill_and_resume_is_exactly_once(fake_site, fake_checkpoint, tmp_path, fake):
    """A job killed (SIGKILL) mid-way, rerun with the same command, finishes without losing or repeating anything."""
    import gesso

    site = tmp_path / "slow-site"
    write_distribution(site, "gesso-slow-family", {"slow": "gesso_slow_family"})
    (site / "gesso_slow_family.py").write_text(SLOW_FAMILY)
    model = tmp_path / "slow-model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "SlowTextToImagePipeline"}))
    prompts = [f"item {i}" for i in range(10)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(fake_site), str(FAKE_FAMILY_DIR), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "gesso",
        "batch",
        "--model",
        str(model),
        "--prompts",
        "p.txt",
        "--out",
        "out",
        "seed=9",
        "batch_size=1",
    ]
    out = tmp_path / "out"
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "manifest.jsonl").is_file() and (out / "manifest.jsonl").read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    finished = {r["index"]: r for r in manifest(out)}
    assert 3 <= len(finished) < 10
    stamps = {i: (out / r["file"]).stat().st_mtime_ns for i, r in finished.items()}

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{10 - len(finished)} written" in resumed.stderr or "already done" in resumed.stderr
    assert_exactly_once(out, 10)
    assert {i: (out / r["file"]).stat().st_mtime_ns for i, r in finished.items()} == stamps  # untouched
    reference = gesso.batch(prompts, tmp_path / "ref", model=str(fake_checkpoint), overrides=["seed=9"])
    assert reference.exit_code == 0
    for i in range(10):  # the same pixels as a job that was never interrupted
        assert_same_image(Image.open(out / f"{i:05d}.png"), Image.open(tmp_path / "ref" / f"{i:05d}.png"))


def test_usage_errors_exit_2_with_one_line(gesso_cli, fake_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("x\n")
    cases = {
        ("--prompts", "absent.txt"): "absent.txt does not exist",
        ("--prompts", "p.txt", "num_images_per_prompt=2"): "num_images_per_prompt",
        ("--prompts", "p.txt", "batch_size=0"): "batch_size: must be a positive integer",
        ("--prompts", "p.txt", "--workers", "2"): "--workers is for --engine ray",
        ("--prompts", "p.txt", "hieght=64"): "did you mean 'height'",
    }
    for arguments, message in cases.items():
        code, stderr = gesso_cli("batch", "--model", str(fake_checkpoint), "--out", "o", *arguments)
        assert code == 2, (arguments, stderr)
        assert message in stderr and stderr.strip().count("\n") == 0, stderr
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "00000.png").write_bytes(b"")
    code, stderr = gesso_cli("batch", "--model", str(fake_checkpoint), "--out", "foreign", "--prompts", "p.txt")
    assert code == 2 and "no gesso batch job recorded" in stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    code, stderr = gesso_cli("batch", "--model", str(fake_checkpoint), "--prompts", "p.txt", "--out", "r", "--engine", "ray")
    assert code == 2 and stderr.strip().count("\n") == 0 and "pip install 'gesso[ray]'" in stderr
