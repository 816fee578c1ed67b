"""TRACT and BTD targets, their index arithmetic, schedules, phases and the EMAs."""

import pytest
import torch
from scipy.stats import chisquare

from tract_repro.diffusion.ddim import ddim_step
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import BTD, TRACT, TeacherTraining
from tract_repro.methods.base import Networks
from tract_repro.methods.btd import btd_indices, halving_schedule
from tract_repro.methods.ema import EMA, momentum_from_residual
from tract_repro.methods.phases import check_schedule, phase_at, plan_phases
from tract_repro.methods.tract import tract_indices
from tract_repro.common.lengths import parse_samples
from tract_repro.training.optim import InferenceEMA, learning_rate

T = 1024
GRID = TimeGrid(CosineSchedule(), T)


def fake_denoiser(scale, shift):
    """A deterministic D(x_t, λ) whose x̂ often leaves [−1, 1], so clipping matters."""
    def D(x_t, logsnr, labels=None):
        return scale * torch.tanh(x_t + shift * torch.tanh(logsnr / 10).view(-1, 1, 1, 1))
    return D


TEACHER, SELF_TEACHER = fake_denoiser(1.6, 0.3), fake_denoiser(1.2, -0.5)


def batch(n=512, seed=0):
    return torch.rand((n, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def phase_of(S, p):
    return plan_phases(S, per_phase=[1] * (len(S) - 1))[p]


def run_method(method, S, p, seed=0):
    """Call the method and replay its generator to recover the time indices it drew."""
    gen = torch.Generator().manual_seed(seed)
    state = gen.get_state()
    target = method(batch(), None, phase_of(S, p), Networks(TEACHER, SELF_TEACHER), GRID, gen)
    gen.set_state(state)
    draw = tract_indices if isinstance(method, TRACT) else btd_indices
    return target, draw(S, p, T, 512, gen)


def at(i):
    return GRID.at(i)


@pytest.mark.parametrize("p", [0, 1])
def test_tract_target_is_the_teacher_x_hat_when_t1_is_the_group_end(p):
    S = (1024, 32, 1)
    target, (t, t1, ti) = run_method(TRACT(schedule=S), S, p)
    last = t1 == ti
    assert last.any() and (~last).any()
    x_hat = TEACHER(target.x_t, target.logsnr).clamp(-1, 1)
    torch.testing.assert_close(target.x_target[last], x_hat[last], rtol=0, atol=1e-9)


@pytest.mark.parametrize("S,p", [((1024, 32, 1), 0), ((1024, 32, 1), 1), ((1024, 1), 0), ((4096 // 4, 256, 16, 1), 2)])
def test_tract_target_lands_on_the_teacher_then_self_teacher_path(S, p):
    """A one-step unclipped DDIM with x̃ from t to t_i reproduces teacher (t→t₁) + self-teacher (t₁→t_i)."""
    target, (t, t1, ti) = run_method(TRACT(schedule=S), S, p)
    x_t = target.x_t
    for b in range(0, 512, 37):  # a straightforward per-sample reference
        i = torch.tensor([b])
        lt, a_t, s_t = at(t[i]); l1, a1, s1 = at(t1[i]); _, ai, si = at(ti[i])
        x = ddim_step(x_t[i], TEACHER(x_t[i], lt), a_t, s_t, a1, s1, clip=True)
        if t1[b] != ti[b]:
            x = ddim_step(x, SELF_TEACHER(x, l1), a1, s1, ai, si, clip=True)
        landed = ddim_step(x_t[i], target.x_target[i], a_t, s_t, ai, si, clip=False)
        torch.testing.assert_close(landed, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(target.weight, torch.clamp(torch.exp(target.logsnr), min=1.0))


@pytest.mark.parametrize("clip", [False, True])
def test_btd_target_reproduces_the_two_teacher_steps(clip):
    """Unclipped teacher steps (progressive distillation's rule, the default), or clipped ones (BTD.clip, TRACT's rule)."""
    S = halving_schedule(1024, 1)
    for p in (0, 4, 8, 9):
        target, (t, t_mid, s) = run_method(BTD(clip=clip), S, p)
        _, a_t, s_t = at(t); l_mid, a_m, s_m = at(t_mid); _, a_s, s_s = at(s)
        x_hat_t = TEACHER(target.x_t, target.logsnr)
        x_mid = ddim_step(target.x_t, x_hat_t.clamp(-1, 1) if clip else x_hat_t, a_t, s_t, a_m, s_m)
        x_hat_mid = TEACHER(x_mid, l_mid).clamp(-1, 1) if clip else TEACHER(x_mid, l_mid)
        assert clip or (x_hat_mid.abs() > 1).any()  # the fake teacher leaves [−1, 1]: clipping changes the target
        x_s = ddim_step(x_mid, x_hat_mid, a_m, s_m, a_s, s_s)
        one_step = ddim_step(target.x_t, target.x_target, a_t, s_t, a_s, s_s)
        inner = s > 0
        torch.testing.assert_close(one_step[inner], x_s[inner], rtol=0, atol=1e-9)
        torch.testing.assert_close(target.x_target[~inner], x_hat_mid[~inner], rtol=0, atol=0)
        assert (t - s == T // S[p + 1]).all() and (t - t_mid == T // S[p + 1] // 2).all()
        if p == 9:
            assert (~inner).all()  # the last phase's only student step ends at s = 0


@pytest.mark.parametrize("N", [2, 8])
def test_the_stochastic_btd_phase_jumps_two_levels_from_every_level_and_one_from_the_last(N):
    """Meng et al.'s stochastic N-step sampler's student: from every level j·T/N (j = 1..N) the target lands
    on two teacher steps of T/N (on 0 when j = 2), and from the last level (j = 1) it is the teacher's x̂."""
    S = halving_schedule(64, N // 2)
    p = len(S) - 2
    method = BTD(start_steps=64, final_steps=N // 2, stochastic=True)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    target = method(batch(), None, phase_of(S, p), Networks(TEACHER, None), GRID, gen)
    gen.set_state(state)
    t, t_mid, s = btd_indices(S, p, T, 512, gen, every_level=True)
    level = T // N
    assert set(t.tolist()) == {level * j for j in range(1, N + 1)}
    assert (t - t_mid == level).all() and (s == (t - 2 * level).clamp(min=0)).all()
    for b in range(0, 512, 13):  # a straightforward per-sample reference
        i = torch.tensor([b])
        lt, a_t, s_t = at(t[i]); l_m, a_m, s_m = at(t_mid[i]); _, a_s, s_s = at(s[i])
        x_hat_t = TEACHER(target.x_t[i], lt)
        if t_mid[b] == 0:
            torch.testing.assert_close(target.x_target[i], x_hat_t, rtol=0, atol=0)
            continue
        x_mid = ddim_step(target.x_t[i], x_hat_t, a_t, s_t, a_m, s_m)
        if s[b] == 0:
            torch.testing.assert_close(target.x_target[i], TEACHER(x_mid, l_m), rtol=0, atol=1e-12)
            continue
        x_s = ddim_step(x_mid, TEACHER(x_mid, l_m), a_m, s_m, a_s, s_s)
        torch.testing.assert_close(ddim_step(target.x_t[i], target.x_target[i], a_t, s_t, a_s, s_s), x_s, rtol=0, atol=1e-9)


def test_the_stochastic_btd_variant_changes_only_the_last_phase():
    S = halving_schedule(64, 2)
    for p in range(len(S) - 2):
        plain, _ = run_method(BTD(start_steps=64, final_steps=2), S, p)
        varied, _ = run_method(BTD(start_steps=64, final_steps=2, stochastic=True), S, p)
        assert torch.equal(plain.x_target, varied.x_target) and torch.equal(plain.x_t, varied.x_t)
    plain, _ = run_method(BTD(start_steps=64, final_steps=2), S, len(S) - 2)
    varied, _ = run_method(BTD(start_steps=64, final_steps=2, stochastic=True), S, len(S) - 2)
    assert not torch.equal(plain.x_t, varied.x_t)


def test_tract_index_arithmetic_of_1024_32_1_is_uniform_with_the_right_support():
    S, n = (1024, 32, 1), 1024 * 200
    t, t1, ti = tract_indices(S, 0, T, n, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(1, 1025))
    assert (t1 == t - 1).all() and (ti % 32 == 0).all() and ((t - ti >= 1) & (t - ti <= 32)).all()
    assert chisquare(torch.bincount(t - 1, minlength=1024).numpy()).pvalue > 1e-3
    assert (t1 == ti).double().mean().item() == pytest.approx(1 / 32, abs=0.002)
    t, t1, ti = tract_indices(S, 1, T, 32 * 2000, torch.Generator().manual_seed(1))
    assert set(t.tolist()) == set(range(32, 1025, 32))
    assert (t1 == t - 32).all() and (ti == 0).all()
    assert chisquare(torch.bincount(t // 32 - 1, minlength=32).numpy()).pvalue > 1e-3


def test_the_statistical_test_can_fail():
    """The uniformity test above rejects a visibly non-uniform draw (it is not vacuous)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 1025, (1024 * 200,), generator=g)
    t = torch.where(t % 7 == 0, t - 1, t).clamp(min=1)
    assert chisquare(torch.bincount(t - 1, minlength=1024).numpy()).pvalue < 1e-3


def test_schedules_are_validated_with_one_line_errors():
    assert check_schedule([1024, 32, 1], T) == (1024, 32, 1)
    for bad, message in [((1024, 48, 1), "does not divide T"), ((32, 1024, 1), "strictly decreasing"),
                         ((1024,), "at least two"), ((1024, 32, 32), "strictly decreasing"),
                         ((1024, 256, 128 + 64), "does not divide"), (("a", 1), "integers")]:
        with pytest.raises(ValueError, match=message) as info:
            check_schedule(bad, T)
        assert "\n" not in str(info.value)
    assert halving_schedule(1024, 1) == tuple(2**k for k in range(10, -1, -1))
    with pytest.raises(ValueError, match="odd"):
        halving_schedule(96, 1)


def test_phases_split_evenly_or_per_phase():
    phases = plan_phases((1024, 32, 1), total="96M")
    assert [p.length for p in phases] == [48 * 2**20] * 2 and phases[1].start == 48 * 2**20
    assert (phases[0].teacher_steps, phases[0].student_steps, phases[1].student_steps) == (1024, 32, 1)
    phases = plan_phases((4096, 256, 16, 1), per_phase="48M")
    assert [p.end for p in phases] == [48 * 2**20 * k for k in (1, 2, 3)]
    phases = plan_phases((1024, 32, 1), per_phase=[100, 50])
    assert phase_at(phases, 0).index == 0 and phase_at(phases, 99).index == 0
    assert phase_at(phases, 100).index == 1 and phase_at(phases, 149).index == 1
    assert [p.length for p in plan_phases((8, 4, 2, 1), total=10)] == [3, 3, 4]
    with pytest.raises(ValueError, match="exactly one"):
        plan_phases((1024, 1), total=10, per_phase=[10])
    with pytest.raises(ValueError, match="has 3 entries"):
        plan_phases((1024, 32, 1), per_phase=[1, 2, 3])


def test_sample_counts_parse_with_binary_suffixes():
    assert parse_samples("96M") == 100_663_296 and parse_samples("1M") == 2**20
    assert parse_samples("200K") == 204_800 and parse_samples("1.5K") == 1536 and parse_samples(4096) == 4096
    for bad in ("96m", "x", "1.3K", -5, True):
        with pytest.raises(ValueError):
            parse_samples(bad)


def test_ema_is_bias_corrected():
    source = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(source, momentum=0.5)
    weights, values = [], [3.0, -1.0, 5.0, 2.0, 7.0]
    for v in values:
        weights.append(ema.decay())
        source.weight.data.fill_(v)
        ema.update(source)
        if len(weights) == 1:
            assert ema.module.weight.item() == 3.0  # the first update copies
    assert weights[:4] == pytest.approx([1, 2 / 3, 4 / 7, 8 / 15])
    k, mu = len(values), 0.5  # closed form: weights μ^(k−i)·(1−μ)/(1−μ^k)
    expected = sum(mu ** (k - 1 - i) * (1 - mu) / (1 - mu**k) * v for i, v in enumerate(values))
    assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    ema.restart()
    assert ema.decay() == 1.0
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(1, 1, bias=False), momentum=0.9)
    other.load_state_dict(state)
    assert (other.steps, other.momentum, other.module.weight.item()) == (0, 0.5, ema.module.weight.item())
    with pytest.raises(ValueError):
        EMA(source, momentum=1.0)


def test_inference_ema_from_residual():
    """μ_I = r^(1/n): the official README run (96M, batch 256, 2 phases) gives 0.99996487."""
    phases = plan_phases((1024, 32, 1), total="96M")
    mu = InferenceEMA(residual=1e-3).for_phase(phases[0], 256)
    assert mu == pytest.approx(0.99996487, abs=1e-8)
    assert mu ** (48 * 2**20 / 256) == pytest.approx(1e-3, rel=1e-9)
    assert InferenceEMA(momentum=0.99995).for_phase(phases[0], 256) == 0.99995
    assert momentum_from_residual(0.25, 2) == 0.5
    with pytest.raises(ValueError, match="set inference_ema_momentum"):
        InferenceEMA().check()
    fixed = InferenceEMA(momentum=0.9, residual=1e-3)  # fixed μ_I wins
    assert fixed.for_phase(phases[0], 256) == 0.9 and fixed == InferenceEMA(momentum=0.9)
    assert (fixed.label, fixed.setting) == ("momentum=0.9", {"momentum": 0.9})  # a number from gin to the checkpoint


def test_learning_rate_warmup_and_linear_decay():
    phase = plan_phases((4, 2, 1), per_phase=[100, 100])[1]
    assert learning_rate(1.0, 150, phase) == 1.0
    assert learning_rate(1.0, 150, phase, decay="linear") == pytest.approx(0.5)
    assert learning_rate(1.0, 100, phase, decay="linear") == 1.0
    assert learning_rate(2.0, 50, phase, warmup=200) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="constant"):
        learning_rate(1.0, 0, phase, decay="cosine")


def test_teacher_training_target_is_the_data_with_its_weight():
    gen = torch.Generator().manual_seed(0)
    x = batch()
    target = TeacherTraining(weighting="snr")(x, None, None, Networks(), GRID, gen)
    assert target.x_target is x
    torch.testing.assert_close(target.weight, torch.exp(target.logsnr))
    alpha, sigma = GRID.alpha_sigma(target.logsnr)
    eps = (target.x_t - alpha * x) / sigma
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05  # x_t = αx + σε with ε ~ N(0, I)


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
                               torch.nn.Conv2d(4, 1, 3, padding=1))


def test_multi_tensor_adam_and_ema_equal_their_per_parameter_loops_bit_for_bit():
    """The foreach Adam and EMA updates (fast on the CPU) are the same arithmetic as the plain loops."""
    import copy

    from tract_repro.training.optim import adam

    fast, plain = _small_net(), _small_net()
    opt_fast, opt_plain = adam(fast.parameters(), lr=1e-2), torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False)
    ema, reference = EMA(fast, 0.9), copy.deepcopy(plain)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for k in range(1, 6):
        for net, opt in ((fast, opt_fast), (plain, opt_plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        d = ema.decay()
        ema.update(fast)
        with torch.no_grad():
            for p, q in zip(reference.parameters(), plain.parameters()):
                p.lerp_(q, d)  # θ_ema ← θ_ema + d·(θ − θ_ema), one tensor at a time
    assert all(torch.equal(p, q) for p, q in zip(fast.parameters(), plain.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(ema.module.parameters(), reference.parameters()))
    assert opt_fast.defaults["foreach"] is True


def float32_network(scale, shift):
    """A stand-in for a float32 network: computes in float32, answers in its input's dtype."""
    def D(x_t, logsnr, cond=None):
        return (scale * torch.tanh(x_t.float() + shift * torch.tanh(logsnr.float() / 10).view(-1, 1, 1, 1))).to(x_t.dtype)
    return D


@pytest.mark.parametrize("name,p", [("tract", 0), ("tract", 1), ("btd", 0), ("btd", 4), ("btd", 9)])
def test_float32_targets_stay_within_a_bound_of_the_float64_computation(name, p):
    """Device.precision = 'float32': the images of a target in float32, λ, α, σ and the DDIM coefficients in float64.
    On T = 1024 with TRACT 1024→32→1 and BTD 1024→…→1, from the same draws, every target is within 5e-4 of the
    float64 one (measured: 1.8e-4 at most, in the phases whose inversions span one or two fine steps, where the
    division by α_t·σ_s − α_s·σ_t amplifies float32's rounding of x_t and x_s; 3e-7 in the last ones), including the
    rows that start at t = T and those whose teacher step ends the group."""
    S = (1024, 32, 1) if name == "tract" else halving_schedule(1024, 1)
    method = TRACT(schedule=S) if name == "tract" else BTD()
    nets = Networks(float32_network(1.6, 0.3), float32_network(1.2, -0.5))
    x = batch(n=4096)
    phase = phase_of(S, p)
    exact = method(x, None, phase, nets, GRID, torch.Generator().manual_seed(1))
    low = method(x.float(), None, phase, nets, GRID, torch.Generator().manual_seed(1))
    assert low.x_target.dtype == low.x_t.dtype == torch.float32 and exact.x_target.dtype == torch.float64
    assert low.logsnr.dtype == low.weight.dtype == torch.float64
    error = (low.x_target.double() - exact.x_target).abs().flatten(1).amax(1)
    draw = tract_indices if name == "tract" else btd_indices
    t, t1, ti = draw(S, p, T, 4096, torch.Generator().manual_seed(1))
    assert (t == T).any() and error[t == T].max() < 5e-4
    if name == "tract":
        assert (t1 == ti).any() and error[t1 == ti].max() < 5e-4
    assert error.max() < 5e-4 and error.median() < 5e-5
