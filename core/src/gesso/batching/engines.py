"""Where a batch job's images are made: in this process (``local``) or on Ray actors (``ray``).

Both engines take tasks ``(index, config, yaml)`` (the item's resolved run config as a plain
mapping, and that config as YAML for the ``gesso`` chunk) and yield :class:`Outcome` objects in
any order: the finished PNG's bytes, or the item's error. The driver writes files and records.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gesso.batching.manifest import BatchError

#: (index, resolved run config as a plain mapping)
Task = tuple[int, Mapping[str, Any]]

RAY_HINT = "--engine ray needs Ray, which is not installed: pip install 'gesso[ray]'"


@dataclass
class Outcome:
    index: int
    png: bytes | None = None
    nsfw: bool = False
    error: str | None = None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text}"


class Renderer:
    """Loads the pipeline once (per model / scheduler / dtype ...) and renders items one image each.

    Every item is its own pipeline call with ``torch.Generator("cpu").manual_seed(seed)`` and
    ``num_images_per_prompt=1``, so its pixels equal ``gesso run`` with that config and seed,
    whatever engine, worker or batch the item lands in.
    """

    def __init__(self, host: Any = None) -> None:
        from gesso.runner import PipelineCache

        self._host = host
        self._cache = PipelineCache()

    def render(self, tasks: Sequence[Task]) -> list[Outcome]:
        outcomes = []
        for index, config in tasks:
            try:
                png, nsfw = self.render_one(config)
                outcomes.append(Outcome(index, png, nsfw))
            except Exception as err:  # one bad item never stops the job
                outcomes.append(Outcome(index, error=one_line(err)))
        return outcomes

    def render_one(self, container: Mapping[str, Any]) -> tuple[bytes, bool]:
        import numpy as np
        import torch
        from omegaconf import OmegaConf
        from PIL import PngImagePlugin

        from gesso.images import numpy_to_pil
        from gesso.plugins import get_host
        from gesso.runner import call_arguments, metadata_chunks

        host = self._host or get_host()
        config = OmegaConf.create(dict(container))
        pipeline = self._cache.get(config, host)
        pipeline.set_progress_bar_config(disable=True)
        arguments = call_arguments(config, host)
        result = pipeline(**arguments, output_type="np", generator=torch.Generator("cpu").manual_seed(int(config.seed)))
        images = result.images
        if isinstance(images, np.ndarray):
            if not np.isfinite(images).all():
                raise FloatingPointError("the image holds NaN or infinite values (with float16, try dtype=float32 or bfloat16)")
            images = numpy_to_pil(images)  # what output_type="pil" does, after the check
        if len(images) != 1:
            raise RuntimeError(f"the pipeline made {len(images)} images for one item")
        chunks = metadata_chunks(config, pipeline, images)[0]
        info = PngImagePlugin.PngInfo()
        for key, value in chunks.items():
            info.add_itxt(key, value)
        buffer = io.BytesIO()
        images[0].save(buffer, format="PNG", pnginfo=info)
        flagged = bool(result.nsfw_content_detected and result.nsfw_content_detected[0])
        return buffer.getvalue(), flagged


def run_local(tasks: Sequence[Task], *, batch_size: int, host: Any = None, **_: Any) -> Iterator[Outcome]:
    renderer = Renderer(host)
    for start in range(0, len(tasks), batch_size):
        yield from renderer.render(tasks[start : start + batch_size])


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BatchError(RAY_HINT) from None
    return ray


def run_ray(tasks: Sequence[Task], *, batch_size: int, workers: int | None = None, **_: Any) -> Iterator[Outcome]:
    """Ray actors, one per GPU (``num_gpus=1``) or per CPU on a machine without GPUs.

    Connects to ``RAY_ADDRESS`` when set, else to the Ray this process already started, else
    starts a local one (and stops it afterwards). Tasks go out ``batch_size`` items at a time, two
    batches queued per actor so a worker never waits for the driver.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if not os.environ.get("RAY_ADDRESS"):
            options["include_dashboard"] = False
        ray.init(**options)
        started = True
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        capacity = gpus or max(1, int(resources.get("CPU", 1)))
        count = workers or (gpus or 1)
        if count > capacity:
            print(f"gesso batch: the cluster has room for {capacity} worker(s), not {count}; using {capacity}", file=sys.stderr)
            count = capacity
        count = min(count, max(1, -(-len(tasks) // batch_size)))
        resource = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        remote = ray.remote(Renderer).options(**resource)
        actors = [remote.remote() for _ in range(count)]
        yield from _dispatch(ray, actors, tasks, batch_size)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _dispatch(ray: Any, actors: list[Any], tasks: Sequence[Task], batch_size: int) -> Iterator[Outcome]:
    batches = deque(list(tasks[start : start + batch_size]) for start in range(0, len(tasks), batch_size))
    in_flight: dict[Any, tuple[Any, list[Task]]] = {}
    alive = list(actors)

    def submit(actor: Any) -> None:
        if batches:
            chunk = batches.popleft()
            in_flight[actor.render.remote(chunk)] = (actor, chunk)

    for actor in alive:
        submit(actor)
        submit(actor)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor, chunk = in_flight.pop(ready[0])
        try:
            outcomes = ray.get(ready[0])
        except Exception as err:  # the actor died or could not start: its items fail, the job goes on
            message = one_line(err).splitlines()[0][:500]
            outcomes = [Outcome(index, error=f"worker failed: {message}") for index, _ in chunk]
            if actor in alive:
                alive.remove(actor)
        yield from outcomes
        if actor in alive:
            submit(actor)
        elif not alive:
            while batches:  # no worker left
                yield from (Outcome(index, error="worker failed: no Ray worker left") for index, _ in batches.popleft())


ENGINES = {"local": run_local, "ray": run_ray}
