"""Loading/saving, short names, validation, GPU-friendliness and the less common step options."""

from __future__ import annotations

import inspect
import json
from typing import Any

import gesso.schedulers as ours
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from scheduler_helpers import fake_model, real_configs, run_loop  # noqa: E402

CONFIGS = real_configs()
NAMES = [cls.__name__ for cls in ours.BUILTIN_SCHEDULERS]


def _base_for(name: str) -> dict[str, Any]:
    return CONFIGS["kandinsky22_prior"] if name == "UnCLIPScheduler" else CONFIGS["sd15"]


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip(name: str, tmp_path: Any) -> None:
    original = getattr(ours, name).from_config(_base_for(name))
    original.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name
    loaded = getattr(ours, name).from_pretrained(tmp_path, subfolder="scheduler")
    assert dict(loaded.config) == json.loads(json.dumps(dict(original.config)))


@pytest.mark.parametrize("name", NAMES)
def test_loads_config_saved_by_reference(name: str, tmp_path: Any) -> None:
    reference = getattr(diffusers, name).from_config(_base_for(name), steps_offset=1)
    reference.save_pretrained(tmp_path)
    mine = getattr(ours, name).from_pretrained(tmp_path)
    for key, value in mine.config.items():
        if key in reference.config and key != "solver_p":
            assert value == reference.config[key] or list(value or []) == list(reference.config[key] or []), key
    ref_keys = set(inspect.signature(type(reference).__init__).parameters) - {"self"}
    assert ref_keys <= set(mine.config), f"keys the reference has and we lack: {ref_keys - set(mine.config)}"


def test_stale_keys_are_ignored_but_carried_like_the_reference() -> None:
    """Unknown keys do not reach ``__init__`` but stay in ``.config`` (as in the reference), so a
    scheduler swapped in from this one still sees the checkpoint's keys (PNDM's ``clip_sample``)."""
    config = {**CONFIGS["sd15"], "skip_prk_steps": True, "some_future_key": 3, "_diffusers_version": "0.1"}
    scheduler = ours.EulerDiscreteScheduler.from_config(config)
    reference = diffusers.EulerDiscreteScheduler.from_config(config)
    assert scheduler.config["some_future_key"] == reference.config["some_future_key"] == 3
    assert "_diffusers_version" not in scheduler.config
    swapped = ours.DDIMScheduler.from_config(ours.PNDMScheduler.from_config({**CONFIGS["sd15"], "clip_sample": False}).config)
    assert swapped.config.clip_sample is False


@pytest.mark.parametrize("name", NAMES)
def test_compatibles_match_reference(name: str) -> None:
    mine = {cls.__name__ for cls in getattr(ours, name).from_config(_base_for(name)).compatibles}
    ref = {cls.__name__ for cls in getattr(diffusers, name).from_config(_base_for(name)).compatibles}
    assert mine == ref & set(NAMES)


def test_short_names_cover_the_usual_samplers() -> None:
    expected = {"euler", "euler_a", "heun", "lms", "ddim", "ddpm", "pndm", "dpmpp_2m", "dpmpp_2m_karras",
                "dpmpp_2m_sde_karras", "dpmpp_2s", "unipc", "deis", "lcm", "kdpm2", "kdpm2_a"}  # fmt: skip
    assert expected <= set(ours.SHORT_NAMES)
    for class_name, _ in ours.SHORT_NAMES.values():
        assert hasattr(ours, class_name)


@pytest.mark.parametrize("short", sorted(ours.SHORT_NAMES))
def test_scheduler_from_name_keeps_base_config(short: str) -> None:
    base = {**CONFIGS["sdxl"], "prediction_type": "v_prediction"}
    scheduler = ours.scheduler_from_name(short, base)
    class_name, overrides = ours.SHORT_NAMES[short]
    assert type(scheduler).__name__ == class_name
    for key in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset", "prediction_type"):
        if key in scheduler.config and key not in overrides:
            assert scheduler.config[key] == base[key], key
    for key, value in overrides.items():
        assert scheduler.config[key] == value
    # same betas as the reference built the same way
    reference = getattr(diffusers, class_name).from_config(base, **overrides)
    torch.testing.assert_close(scheduler.alphas_cumprod, reference.alphas_cumprod)


def test_karras_and_sde_short_names_match_reference_trajectory() -> None:
    x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    for short in ("dpmpp_2m_karras", "dpmpp_2m_sde_karras"):
        class_name, overrides = ours.SHORT_NAMES[short]
        mine = ours.scheduler_from_name(short, CONFIGS["sdxl"])
        ref = getattr(diffusers, class_name).from_config(CONFIGS["sdxl"], **overrides)
        torch.testing.assert_close(run_loop(mine, 12, x0, 5)[-1], run_loop(ref, 12, x0, 5)[-1], rtol=2e-5, atol=2e-5)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        ours.scheduler_from_name("eulr", CONFIGS["sd15"])
    for short in ("euler", "dpmpp_2m_karras", "unipc"):
        assert short in str(err.value)


def test_registry_argument_restricts_classes() -> None:
    registry = {"EulerDiscreteScheduler": ours.EulerDiscreteScheduler}
    assert isinstance(ours.scheduler_from_name("euler", CONFIGS["sd15"], registry), ours.EulerDiscreteScheduler)
    with pytest.raises(ValueError, match="DDIMScheduler"):
        ours.scheduler_from_name("ddim", CONFIGS["sd15"], registry)


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("DDIMScheduler", "beta_schedule", "cubic"),
        ("EulerDiscreteScheduler", "timestep_spacing", "middle"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "dpm-magic"),
        ("DPMSolverMultistepScheduler", "prediction_type", "x_start"),
        ("DDPMScheduler", "variance_type", "wide"),
        ("UniPCMultistepScheduler", "solver_type", "bh9"),
        ("EulerDiscreteScheduler", "final_sigmas_type", "one"),
        ("UnCLIPScheduler", "variance_type", "fixed_large"),
    ],
)
def test_bad_values_name_the_key_and_choices(name: str, key: str, value: str) -> None:
    with pytest.raises(ValueError) as err:
        getattr(ours, name).from_config(_base_for(name), **{key: value})
    message = str(err.value)
    assert key in message and repr(value) in message and "choose one of" in message


def test_exclusive_sigma_options_are_refused() -> None:
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        ours.EulerDiscreteScheduler.from_config(CONFIGS["sdxl"], use_karras_sigmas=True, use_exponential_sigmas=True)


class _HostReadError(AssertionError):
    pass


def _forbid(*args: Any, **kwargs: Any) -> Any:
    raise _HostReadError("a tensor was read back to the host inside step()")


@pytest.mark.parametrize("name", NAMES)
def test_step_does_not_read_tensors_back(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first step no tensor value is pulled to Python (no .item(), bool(), nonzero...)."""
    overrides = {"algorithm_type": "sde-dpmsolver++"} if name.startswith("DPMSolver") else {}
    scheduler = getattr(ours, name).from_config(_base_for(name), **overrides)
    scheduler.set_timesteps(8)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(0)
    timesteps = scheduler.timesteps
    steps = 0
    for i, t in enumerate(timesteps):
        if i == 1:
            for attr in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero", "cpu", "numpy"):
                monkeypatch.setattr(torch.Tensor, attr, _forbid)
        kwargs: dict[str, Any] = {}
        if name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                    "LCMScheduler", "UnCLIPScheduler", "DPMSolverMultistepScheduler",
                    "DPMSolverSinglestepScheduler"):  # fmt: skip
            kwargs["generator"] = generator
        if name == "UnCLIPScheduler":
            kwargs["prev_timestep"] = None if i + 1 == len(timesteps) else timesteps[i + 1]
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
        steps += 1
    monkeypatch.undo()
    assert steps == len(timesteps) and torch.isfinite(x).all()


def test_ddim_eta_and_euler_churn_match_reference() -> None:
    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    pairs = [
        ("DDIMScheduler", {"eta": 1.0}),
        ("DDIMScheduler", {"eta": 0.5, "use_clipped_model_output": True}),
        ("EulerDiscreteScheduler", {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0}),
    ]
    for name, kwargs in pairs:
        mine = getattr(ours, name).from_config(CONFIGS["sd15"])
        ref = getattr(diffusers, name).from_config(CONFIGS["sd15"])
        for a, b in zip(run_loop(mine, 10, x0, 11, **kwargs), run_loop(ref, 10, x0, 11, **kwargs), strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_generator_list_draws_per_batch_element() -> None:
    x0 = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    results = []
    for module in (ours, diffusers):
        scheduler = module.EulerAncestralDiscreteScheduler.from_config(CONFIGS["sdxl"])
        scheduler.set_timesteps(6)
        gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        x = x0 * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x, generator=gens).prev_sample
        results.append(x)
    torch.testing.assert_close(results[0], results[1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_reference(name: str) -> None:
    mine = getattr(ours, name).from_config(_base_for(name))
    ref = getattr(diffusers, name).from_config(_base_for(name))
    mine.set_timesteps(10)
    ref.set_timesteps(10)
    clean = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    ts = ref.timesteps[[2, 5]]
    torch.testing.assert_close(mine.add_noise(clean, noise, ts), ref.add_noise(clean, noise, ts))


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler",
                                  "HeunDiscreteScheduler", "UniPCMultistepScheduler"])  # fmt: skip
def test_img2img_start_mid_schedule_matches_reference(name: str) -> None:
    """Pipelines slice the timesteps (strength < 1) and may call set_begin_index."""
    x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(8))
    finals = []
    for module in (ours, diffusers):
        scheduler = getattr(module, name).from_config(CONFIGS["sd15"])
        scheduler.set_timesteps(10)
        start = 4 * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        x = scheduler.add_noise(x0, x0.flip(-1), timesteps[:1])
        for t in timesteps:
            x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        finals.append(x)
    torch.testing.assert_close(finals[0], finals[1], rtol=2e-5, atol=2e-5)


def test_lms_coefficients_integrate_lagrange_basis_exactly() -> None:
    """The quadrature must reproduce closed-form integrals of the Lagrange basis (exact for cubics)."""
    from gesso.schedulers.kdiffusion import integrate, lms_coefficient

    assert integrate(lambda x: 4 * x**3 - 2 * x, -0.3, 1.7) == pytest.approx((1.7**4 - 1.7**2) - (0.3**4 - 0.3**2))
    sig = [14.6, 9.0, 5.2, 2.9, 1.1]
    i = 3
    for order in (1, 2, 3, 4):
        coeffs = [lms_coefficient(sig, order, i, j) for j in range(order)]
        # the basis polynomials sum to 1, so the coefficients sum to the interval length
        assert sum(coeffs) == pytest.approx(sig[i + 1] - sig[i], rel=1e-12)
    two = lms_coefficient(sig, 2, i, 0)  # integral of (tau - s_{i-1}) / (s_i - s_{i-1})
    a, b, s0, s1 = sig[i], sig[i + 1], sig[i], sig[i - 1]
    assert two == pytest.approx(((b - s1) ** 2 - (a - s1) ** 2) / (2 * (s0 - s1)), rel=1e-12)
