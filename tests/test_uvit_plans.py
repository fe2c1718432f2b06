"""U-ViT through the whole pipeline: DPM-Solver-2 schedules (rows = model evaluations), the
published U-ViT L2C routers, export, and the ONNX Runtime and torch backends against the eager
reference on a narrow depth-28 U-ViT with random weights."""

import numpy as np
import pytest
import torch

from conftest import REPO, assert_one_line_error, run_cli
from exporter.export import export_plan, latent_buffers
from exporter.models import load_model
from exporter.reference import sample
from exporter.verify import verify_plan
from runtime import Sampler
from runtime.plan import load_plan
from schedules import BlockcacheError, Schedule
from schedules.l2c import import_l2c
from schedules.safeload import safe_torch_load
from schedules.sampling import initial_noise

pytestmark = pytest.mark.usefixtures("single_thread")
# Depth 28 (29 blocks, 58 units) as U-ViT-H/2, narrow: width 32, 2 heads, 8×8 latents (16 patches + 2 tokens).
NARROW = dict(hidden_size=32, num_heads=2, input_size=8)
NARROW_FLAGS = ["--hidden-size", "32", "--num-heads", "2", "--input-size", "8"]
LABELS = [3, 999]


@pytest.fixture(scope="module")
def uvit():
    return load_model("uvit-h2", random_init=True, seed=1, **NARROW)


def published_schedule(router_file, evaluations, units, threshold=0.9):
    """The published semantics re-derived from the file's own logits: row 2k (outer evaluation of
    solver step k, 1 <= k < NFE/2) computes unit j iff sigmoid(logit_k[j]) > θ; all else computes."""
    logits = safe_torch_load(router_file, "router")
    compute = np.ones((evaluations, len(units)), bool)
    for k in range(1, evaluations // 2):
        compute[2 * k] = (torch.sigmoid(logits[f"{k}.prob"].float()) > threshold).numpy()
    return compute


@pytest.mark.parametrize("nfe", [20, 50])
def test_router_import_matches_the_files_logits(router_dir, nfe):
    from schedules.zoo import model_config, unit_names

    units = unit_names(model_config("uvit-h2"))
    schedule = import_l2c(router_dir / f"dpm{nfe}_router.pth", units, nfe, sampler="dpm-solver-2")
    np.testing.assert_array_equal(schedule.compute, published_schedule(router_dir / f"dpm{nfe}_router.pth", nfe, units))
    assert schedule.sampler == {"name": "dpm-solver-2", "steps": nfe, "spacing": "time-uniform"}
    assert schedule.compute[1::2].all()  # every intermediate evaluation computes everything
    assert not schedule.compute.all()


@pytest.mark.parametrize("nfe", [20, 50])
def test_committed_presets_are_the_imports(router_dir, nfe):
    preset = Schedule.load(REPO / "schedules" / "presets" / f"uvit-h2-l2c-dpm{nfe}.yaml")
    np.testing.assert_array_equal(preset.compute, published_schedule(router_dir / f"dpm{nfe}_router.pth", nfe,
                                                                     preset.unit_names))
    assert preset.sampler["name"] == "dpm-solver-2" and preset.model == "uvit-h2"


def test_latent_buffers_never_overwrite_a_live_latent():
    for source in (np.arange(7), [0, 0, 2, 2, 4, 4, 6, 6]):
        holder = {0: 0}  # evaluation → buffer holding its input, replayed independently
        for s, (latent, carry, out) in enumerate(latent_buffers(source)):
            assert latent == holder[s] and carry == holder[int(source[s])]
            assert out not in (latent, carry)
            holder[s + 1] = out
        assert max(max(slot) for slot in latent_buffers(source)) < 3


def schedules_for(model, router_dir=None):
    out = {"full": Schedule.full(model.unit_names, 8, sampler="dpm-solver-2")}
    if router_dir is not None:
        compute = published_schedule(router_dir / "dpm20_router.pth", 20, model.unit_names)
        out["l2c"] = Schedule(model.unit_names, compute, {"name": "dpm-solver-2", "steps": 20,
                                                          "spacing": "time-uniform"})
    else:  # reuse on every outer evaluation after the first, from the intermediate one before it
        compute = np.ones((8, len(model.unit_names)), bool)
        compute[2::2, 1::3] = False
        out["l2c"] = Schedule(model.unit_names, compute, {"name": "dpm-solver-2", "steps": 8, "spacing": "time-uniform"})
    return out


@pytest.mark.parametrize("kind", ["full", "l2c"])
def test_plan_matches_eager_reference(uvit, kind, tmp_path, request):
    router_dir = request.getfixturevalue("router_dir") if kind == "l2c" else None
    schedule = schedules_for(uvit, router_dir)[kind]
    path = str(tmp_path / "plan")
    manifest = export_plan(uvit, schedule, path, batch_size=2, guidance_scale=0.4)
    assert manifest["model"]["family"] == "uvit" and manifest["guidance"]["channels"] == "uvit"
    assert "x_carry" in manifest["inputs"] and manifest["inputs"]["timestep"]["dtype"] == "float32"
    noise = initial_noise((2, 4, 8, 8), 5)
    want = sample(uvit, schedule, LABELS, noise, guidance_scale=0.4)
    unguided = sample(uvit, schedule, LABELS, noise, guidance_scale=0.0)
    assert np.abs(want - unguided).max() > 1e-3 * np.abs(want).max()  # guidance and labels matter
    for backend in ("onnxruntime", "torch"):
        got = Sampler(path, backend=backend, device="cpu")(LABELS, noise=noise)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), backend
    if kind == "l2c":
        full = sample(uvit, Schedule.full(uvit.unit_names, 20, sampler="dpm-solver-2"), LABELS, noise,
                      guidance_scale=0.4)
        assert np.abs(full - want).max() > 1e-6  # the cache really is read
    verify_plan(uvit, load_plan(path), 1e-4)


def test_reference_follows_the_solver_by_hand(uvit):
    """The eager run equals the DPM-Solver++ 2S update written out here with the sampler's own
    noise schedule: x_s1 from the outer evaluation's x0, x_t from the intermediate one's."""
    from schedules.dpm_solver import DiscreteVP, DPMSolver2Sampler

    sampler, vp = DPMSolver2Sampler(4), DiscreteVP()
    noise = initial_noise((2, 4, 8, 8), 2)
    x, y = torch.from_numpy(noise).double(), torch.tensor(LABELS)
    null = torch.full_like(y, uvit.null_class)
    model = uvit.double()
    try:
        def x0(z, t):
            with torch.no_grad():
                cond = model(z, torch.full((2,), t * 1000, dtype=torch.float64), y)
                uncond = model(z, torch.full((2,), t * 1000, dtype=torch.float64), null)
            eps = cond + 0.4 * (cond - uncond)
            return (z - vp.sigma(t) * eps) / vp.alpha(t)

        times = sampler.outer_times
        for s, t in zip(times[:-1], times[1:]):
            lam_s, lam_t = vp.lambda_(s), vp.lambda_(t)
            h = lam_t - lam_s
            s1 = vp.inverse_lambda(lam_s + h / 2)
            x_s1 = vp.sigma(s1) / vp.sigma(s) * x - vp.alpha(s1) * np.expm1(-h / 2) * x0(x, s)
            x = vp.sigma(t) / vp.sigma(s) * x - vp.alpha(t) * np.expm1(-h) * x0(x_s1, s1)
    finally:
        uvit.float()
    got = sample(uvit, Schedule.full(uvit.unit_names, 4, sampler="dpm-solver-2"), LABELS, noise, guidance_scale=0.4)
    assert np.abs(got - x.numpy()).max() <= 1e-5 * np.abs(x.numpy()).max()  # measured 5e-7 (fp32 vs fp64)


def test_bad_inputs_one_line(tmp_path, router_dir):
    dit_schedule = tmp_path / "dit.yaml"
    r = run_cli("schedules.cli", "full", "--model", "dit-xl2", "--steps", "20", "-o", dit_schedule)
    assert r.returncode == 0, r.stderr
    base = ["--model", "uvit-h2", *NARROW_FLAGS, "--random-init", "--out", tmp_path / "p"]
    r = run_cli("exporter.export_cli", *base, "--schedule", dit_schedule)  # a DiT schedule on a U-ViT
    assert r.returncode == 2 and "in_blocks" in assert_one_line_error(r.stderr)
    ddim = tmp_path / "ddim-uvit.yaml"
    units = load_model("uvit-h2", random_init=True, **NARROW).unit_names
    Schedule.full(units, 10).save(ddim)  # U-ViT units but a DDIM schedule
    r = run_cli("exporter.export_cli", *base, "--schedule", ddim)
    assert r.returncode == 2 and "ddim" in assert_one_line_error(r.stderr)
    r = run_cli("schedules.cli", "import-l2c", router_dir / "dpm20_router.pth", "--model", "dit-xl2", "--steps", "20",
                "-o", tmp_path / "x.yaml")  # a 58-logit router on a DiT
    assert r.returncode == 2 and "58 logits" in assert_one_line_error(r.stderr)
    r = run_cli("schedules.cli", "full", "--model", "uvit-h2", "--steps", "7", "-o", tmp_path / "odd.yaml")
    assert r.returncode == 2 and assert_one_line_error(r.stderr)
    r = run_cli("schedules.cli", "full", "--model", "uvit-h2", "--learn-sigma", "--steps", "8", "-o", tmp_path / "o.yaml")
    assert r.returncode == 2 and "learn_sigma" in assert_one_line_error(r.stderr)
    assert not (tmp_path / "p").exists()
    with pytest.raises(BlockcacheError, match="ddim"):
        sample(load_model("uvit-h2", random_init=True, **NARROW), Schedule.full(units, 4), [1], initial_noise((1, 4, 8, 8), 0))


def test_cli_round_trip(tmp_path, router_dir):
    r = run_cli("schedules.cli", "import-l2c", router_dir / "dpm20_router.pth", "--model", "uvit-h2", "--steps", "20",
                "-o", tmp_path / "l2c.yaml")
    assert r.returncode == 0, r.stderr
    r = run_cli("schedules.cli", "stats", tmp_path / "l2c.yaml")
    assert r.returncode == 0 and "in the 9 cached evaluations" in r.stdout, r.stdout + r.stderr
    r = run_cli("exporter.export_cli", "--model", "uvit-h2", *NARROW_FLAGS, "--random-init", "--schedule",
                tmp_path / "l2c.yaml", "--out", tmp_path / "plan", "--verify", "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_cli("exporter.sample_cli", "--plan", tmp_path / "plan", "--labels", "1,2", "--out", tmp_path / "z.npy")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "z.npy").shape == (2, 4, 8, 8)


def test_schedule_makers_on_uvit(tmp_path):
    """analyze → derive → scale-shift → export on DPM-Solver-2 evaluations; the plan (with its
    scale-shift inputs and the solver's carry) equals the eager reference."""
    flags = ["--model", "uvit-h2", *NARROW_FLAGS, "--random-init"]
    steps = [("analyze", *flags, "--steps", "8", "-o", tmp_path / "c.npz", "--quiet"),
             ("derive", tmp_path / "c.npz", "--target-speedup", "1.3", "-o", tmp_path / "d.yaml"),
             ("scale-shift", *flags, "--schedule", tmp_path / "d.yaml", "--epochs", "2", "-o", tmp_path / "s.yaml",
              "--quiet")]
    for args in steps:
        r = run_cli("exporter.schedule_cli", *args)
        assert r.returncode == 0, r.stderr
    schedule = Schedule.load(tmp_path / "s.yaml")
    assert schedule.sampler["name"] == "dpm-solver-2" and schedule.scale_shift and not schedule.compute.all()
    model = load_model("uvit-h2", random_init=True, **NARROW)
    export_plan(model, schedule, str(tmp_path / "plan"), batch_size=2, guidance_scale=0.4)
    noise = initial_noise((2, 4, 8, 8), 1)
    want = sample(model, schedule, LABELS, noise, guidance_scale=0.4)
    got = Sampler(str(tmp_path / "plan"), backend="onnxruntime", device="cpu")(LABELS, noise=noise)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("model_name, scale", [("dit-s2", 0.5), ("uvit-h2", 0.0)])
def test_unguided_scales_agree_between_plan_and_reference(model_name, scale, tmp_path):
    """DiT's form: a scale <= 1 means no guidance (the conditional prediction), in the plan and in the
    eager reference alike; U-ViT's form: scale 0."""
    from conftest import TINY

    model = (load_model("uvit-h2", random_init=True, **NARROW) if model_name == "uvit-h2"
             else load_model("dit-s2", random_init=True, **TINY))
    sampler = "dpm-solver-2" if model_name == "uvit-h2" else "ddim"
    schedule = Schedule.uniform(model.unit_names, 4, 2, sampler=sampler)
    export_plan(model, schedule, str(tmp_path / "plan"), batch_size=2)  # guided plan (family default scale)
    noise = initial_noise((2, 4, 8, 8), 0)
    want = sample(model, schedule, LABELS[:1] * 2, noise, guidance_scale=scale)
    got = Sampler(str(tmp_path / "plan"), backend="onnxruntime", device="cpu")(LABELS[:1] * 2, noise=noise,
                                                                               guidance_scale=scale)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    guided = sample(model, schedule, LABELS[:1] * 2, noise)
    assert np.abs(guided - want).max() > 1e-4 * np.abs(want).max()


def test_denoise_never_drops_the_carry_term(uvit):
    """A carry coefficient without the carried latent (or the reverse) is a programming error, refused:
    silently sampling without the term would be a wrong result."""
    from runtime.nn.step import DenoisingStep

    step = DenoisingStep(uvit, guidance=True, guidance_channels="uvit")
    x, y = torch.zeros(2, 4, 8, 8), torch.tensor(LABELS)
    t, one = torch.tensor([500.0]), torch.ones(1)
    for c, x_carry in ((one, None), (None, x)):
        with pytest.raises(ValueError, match="together"):
            step.denoise(x, y, t, one, one, one, c=c, x_carry=x_carry)
