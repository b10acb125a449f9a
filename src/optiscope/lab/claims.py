"""The seed's claims, each turned into a measurement with optiscope's own parts.

Every experiment is a function ``(Context) -> dict`` returning plain data: the
numbers, what theory predicts where it predicts something, the verdict with
its criterion, per-step series, and figure specs that ``report`` draws. Each
seeds its own RNGs from ``ctx.seed`` so that it gives the same result whether
it runs alone, after the others, or after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

import optiscope
from optiscope import rules
from optiscope.functional import dropout

from .data import Dataset
from .training import accuracy, flat_params, full_loss, mlp, monte_carlo_accuracy, train

HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "inconclusive"


@dataclass
class Context:
    data: Dataset
    seed: int
    quick: bool
    advance: Callable[[float], None]  # progress: fraction of this experiment done

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    seed_words: str
    method: str
    run: Callable[[Context], dict[str, Any]]
    needs_digits: bool = False


def _line(title, xlabel, ylabel, series, **extra) -> dict[str, Any]:
    return {
        "type": "line",
        "title": title,
        "xlabel": xlabel,
        "ylabel": ylabel,
        "series": series,
        **extra,
    }


def _series(label: str, y, x=None) -> dict[str, Any]:
    y = [float(v) for v in y]
    return {
        "label": label,
        "x": list(range(len(y))) if x is None else [float(v) for v in x],
        "y": y,
    }


def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


# -- C1 ---------------------------------------------------------------------------------


def _frozen_update_variance(
    ctx: Context, model: nn.Module, beta: float, steps: int, burn_in: int
) -> dict[str, float]:
    """Total variance of the updates at a frozen θ, for three buffers fed the same g_t.

    Minibatches are drawn with replacement, so at fixed θ the g_t are i.i.d.
    Each optimizer steps its own copy of θ, which is reset after every step, so
    the update u_t = θ0 − θ_t is a function of the gradient history alone.
    """
    lr = 0.1
    theta0 = [p.detach().clone() for p in model.parameters()]
    variants = {
        "sgd": optiscope.Momentum,
        "ema": optiscope.Momentum,
        "torch_sum": torch.optim.SGD,
    }
    copies = {k: [nn.Parameter(t.clone()) for t in theta0] for k in variants}
    opts = {
        "sgd": optiscope.Momentum(copies["sgd"], lr=lr, momentum=0.0),
        "ema": optiscope.Momentum(copies["ema"], lr=lr, momentum=beta),
        "torch_sum": torch.optim.SGD(
            copies["torch_sum"], lr=lr, momentum=beta, dampening=0
        ),
    }
    sums = {
        k: torch.zeros(sum(t.numel() for t in theta0), dtype=torch.float64)
        for k in opts
    }
    squares = {k: torch.zeros_like(v) for k, v in sums.items()}
    gen = torch.Generator().manual_seed(ctx.seed + 11)
    n = len(ctx.data.y_train)
    model.train()
    for t in range(steps):
        rows = torch.randint(n, (32,), generator=gen)
        model.zero_grad()
        nn.functional.cross_entropy(
            model(ctx.data.x_train[rows]), ctx.data.y_train[rows]
        ).backward()
        for key, opt in opts.items():
            for copy, p in zip(copies[key], model.parameters(), strict=True):
                copy.grad = p.grad
            opt.step()
            with torch.no_grad():
                update = torch.cat(
                    [
                        (t0 - c).reshape(-1)
                        for t0, c in zip(theta0, copies[key], strict=True)
                    ]
                ).double()
                for c, t0 in zip(copies[key], theta0, strict=True):
                    c.copy_(t0)
            if t >= burn_in:
                sums[key] += update
                squares[key] += update * update
        ctx.advance(0.5 * (t + 1) / steps)
    count = steps - burn_in
    return {
        k: ((squares[k] / count) - (sums[k] / count) ** 2).sum().item() for k in opts
    }


def _window_variance(updates: torch.Tensor, window: int) -> float:
    """Mean over windows of the within-window total variance of the update vectors."""
    chunks = updates[: (len(updates) // window) * window].reshape(
        -1, window, updates.shape[1]
    )
    return chunks.var(dim=1, unbiased=True).sum(dim=1).mean().item()


def claim_momentum_variance(ctx: Context) -> dict[str, Any]:
    beta = 0.9
    data = ctx.data
    model = mlp(data, hidden=64, p_drop=0.0, seed=ctx.seed, depth=1)
    steps = ctx.pick(600, 2000)
    frozen = _frozen_update_variance(ctx, model, beta, steps, burn_in=60)
    ratio_ema = frozen["ema"] / frozen["sgd"]
    ratio_sum = frozen["torch_sum"] / frozen["sgd"]
    predicted_ema = (1 - beta) / (1 + beta)
    predicted_sum = 1 / (1 - beta**2)

    # During real training: θ moves, so compare variances inside short windows.
    training, probe_series = {}, {}
    train_steps = ctx.pick(300, 800)
    for name, b in (("sgd", 0.0), ("momentum", beta)):
        net = mlp(data, hidden=64, p_drop=0.0, seed=ctx.seed, depth=1)
        opt = optiscope.Momentum(net.parameters(), lr=0.1, momentum=b, probe=True)
        trajectory = [flat_params(net)]
        train(
            net,
            opt,
            data,
            steps=train_steps,
            batch=32,
            seed=ctx.seed + 12,
            on_step=lambda _step, net=net, trajectory=trajectory: trajectory.append(
                flat_params(net)
            ),
        )
        updates = -torch.diff(torch.stack(trajectory).double(), dim=0)
        training[name] = _window_variance(updates[50:], window=20)
        probe_series[name] = opt._probe.history.series("group0", "variance_ratio")
        ctx.advance(0.5 + 0.25 * (1 + (name == "momentum")))
    ratio_training = training["momentum"] / training["sgd"]
    ratio_probe = probe_series["momentum"][-1]  # the in-pass estimate, end of training

    within = abs(ratio_ema / predicted_ema - 1) <= 0.15
    verdict = HOLDS if within and ratio_training < 1 and ratio_sum > 1 else FAILS
    betas = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99]
    return {
        "verdict": verdict,
        "headline": f"Var ratio at frozen θ {ratio_ema:.4f} (theory {predicted_ema:.4f}); "
        f"torch SGD buffer {ratio_sum:.2f} (theory {predicted_sum:.2f}); "
        f"in training {ratio_training:.3f} (probe, in-pass: {ratio_probe:.3f})",
        "criterion": "frozen-θ variance ratio within 15% of (1−β)/(1+β); training ratio < 1; "
        "torch's summing buffer ratio > 1",
        "numbers": {
            "beta": beta,
            "frozen_variance_ratio_ema": _round(ratio_ema),
            "predicted_ratio_ema": _round(predicted_ema),
            "frozen_variance_ratio_torch_sgd_buffer": _round(ratio_sum),
            "predicted_ratio_torch_sgd_buffer": _round(predicted_sum),
            "training_variance_ratio": _round(ratio_training),
            "training_variance_ratio_probe": _round(ratio_probe),
            "frozen_steps": steps,
            "training_steps": train_steps,
        },
        "figures": [
            _line(
                "Update variance relative to plain SGD, i.i.d. gradients (theory)",
                "β",
                "Var(update) / Var(SGD update)  (log; lower is smoother)",
                [
                    _series(
                        "EMA momentum (optiscope): (1−β)/(1+β)",
                        [(1 - b) / (1 + b) for b in betas],
                        betas,
                    ),
                    _series(
                        "summing buffer (torch SGD): 1/(1−β²)",
                        [1 / (1 - b * b) for b in betas],
                        betas,
                    ),
                ],
                logy=True,
                points=[
                    {"label": "measured, EMA", "x": [beta], "y": [ratio_ema]},
                    {"label": "measured, torch SGD", "x": [beta], "y": [ratio_sum]},
                ],
            ),
            _line(
                "Probe: in-pass estimate of Var(m)/Var(g) during training",
                "step",
                "Var(m) / Var(g)  (lower is smoother)",
                [
                    _series("momentum β=0.9 (probe)", probe_series["momentum"]),
                    _series("theory for i.i.d. noise", [predicted_ema] * train_steps),
                ],
                logy=True,
            ),
        ],
        "series": {"momentum_probe_variance_ratio": probe_series["momentum"]},
    }


# -- C2 ---------------------------------------------------------------------------------


def _roughness(curve: list[float]) -> float:
    """RMS of the second difference of the loss curve: step-to-step jitter, not trend."""
    y = np.asarray(curve)
    return float(np.sqrt(np.mean(np.diff(y, n=2) ** 2)))


def _rugged(x: torch.Tensor) -> torch.Tensor:
    """A bowl with ripples: global minimum at 0, local minima near every 2π/3."""
    return 0.05 * x**2 + (1 - torch.cos(3 * x))


def claim_low_variance_helps(ctx: Context) -> dict[str, Any]:
    data = ctx.data
    seeds = ctx.pick(3, 5)
    steps = ctx.pick(250, 600)
    rates = [0.1, 0.3, 1.0, 2.0]
    curve_rate = 0.3  # the rate whose per-step loss curves are kept and compared
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    total, done = 2 * seeds * len(rates), 0
    for rate in rates:
        for name, beta in (("sgd", 0.0), ("momentum", 0.9)):
            runs[name, rate] = []
            for i in range(seeds):
                net = mlp(data, hidden=64, p_drop=0.0, seed=ctx.seed + 100 + i, depth=1)
                watched = rate == curve_rate and i == 0
                opt = optiscope.Momentum(
                    net.parameters(), lr=rate, momentum=beta, probe=watched
                )
                history = train(
                    net,
                    opt,
                    data,
                    steps=steps,
                    batch=16,
                    seed=ctx.seed + 200 + i,
                    track_train_loss=rate == curve_rate,
                )
                runs[name, rate].append(
                    {
                        "final_train_loss": full_loss(net, data.x_train, data.y_train),
                        "val_accuracy": accuracy(net, data.x_val, data.y_val),
                        "curve": history.train_loss,
                        "update_to_weight": opt._probe.history.series(
                            "group0", "update_to_weight"
                        )
                        if watched
                        else [],
                    }
                )
                done += 1
                ctx.advance(0.7 * done / total)

    def mean(name: str, rate: float, key: str) -> float:
        return float(np.mean([r[key] for r in runs[name, rate]]))

    def paired(rate: float, key: str) -> tuple[float, float]:
        """Mean momentum − SGD difference over seeds, and its standard error."""
        diff = np.array(
            [
                m[key] - s[key]
                for m, s in zip(runs["momentum", rate], runs["sgd", rate], strict=True)
            ]
        )
        return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))

    def significant(diff: float, se: float) -> str:
        return HOLDS if diff > 2 * se else FAILS if diff < -2 * se else UNCLEAR

    by_rate = []
    for rate in rates:
        acc_diff, acc_se = paired(rate, "val_accuracy")
        loss_diff, loss_se = paired(rate, "final_train_loss")
        by_rate.append(
            {
                "lr": rate,
                "val_accuracy_sgd": _round(mean("sgd", rate, "val_accuracy")),
                "val_accuracy_momentum": _round(mean("momentum", rate, "val_accuracy")),
                "accuracy_difference": _round(acc_diff),
                "accuracy_difference_se": _round(acc_se),
                "final_loss_sgd": _round(mean("sgd", rate, "final_train_loss")),
                "final_loss_momentum": _round(
                    mean("momentum", rate, "final_train_loss")
                ),
                "final_loss_difference": _round(loss_diff),
                "final_loss_difference_se": _round(loss_se),
                "momentum_better": significant(acc_diff, acc_se),
            }
        )
    rough = {
        name: float(np.mean([_roughness(r["curve"]) for r in runs[name, curve_rate]]))
        for name in ("sgd", "momentum")
    }

    # The "big rock": many independent 1-D descents on a rippled bowl with noisy gradients.
    starts = ctx.pick(400, 2000)
    basin = {}
    gen = torch.Generator().manual_seed(ctx.seed + 300)
    x0 = (torch.rand(starts, generator=gen, dtype=torch.float64) * 2 - 1) * 8
    for name, beta in (("sgd", 0.0), ("momentum", 0.9)):
        x = nn.Parameter(x0.clone())
        opt = optiscope.Momentum([x], lr=0.05, momentum=beta)
        noise = torch.Generator().manual_seed(ctx.seed + 301)
        for _ in range(ctx.pick(600, 1500)):
            opt.zero_grad()
            _rugged(x).sum().backward()
            x.grad += 0.5 * torch.randn(starts, generator=noise, dtype=torch.float64)
            opt.step()
        basin[name] = (x.detach().abs() < math.pi / 3).double().mean().item()
    ctx.advance(1.0)
    se = math.sqrt(sum(f * (1 - f) / starts for f in basin.values()))
    basin_diff = basin["momentum"] - basin["sgd"]

    smoother = rough["momentum"] < rough["sgd"]
    rock_verdict = significant(basin_diff, se)
    outcomes = [r["momentum_better"] for r in by_rate]
    if not smoother or FAILS in outcomes or rock_verdict == FAILS:
        verdict = FAILS
    else:
        verdict = HOLDS if HOLDS in outcomes else UNCLEAR
    best = max(by_rate, key=lambda r: r["accuracy_difference"])
    better = [r["lr"] for r in by_rate if r["momentum_better"] == HOLDS]
    even = [r["lr"] for r in by_rate if r["momentum_better"] == UNCLEAR]
    note = (
        f"Momentum is significantly more accurate at lr ∈ {better} and within noise "
        f"at lr ∈ {even}. Where SGD's loss diverges, the averaged update stays "
        "stable: the same low-pass filtering that removes gradient noise also damps "
        "step-to-step oscillation. The big-rock test is "
        f"{rock_verdict} ({basin['momentum']:.3f} vs {basin['sgd']:.3f} of starts "
        "reach the global basin)."
    )
    return {
        "verdict": verdict,
        "note": note,
        "headline": f"roughness {rough['momentum']:.4f} vs SGD {rough['sgd']:.4f}; "
        f"accuracy {best['val_accuracy_momentum']:.3f} vs {best['val_accuracy_sgd']:.3f} "
        f"at lr={best['lr']}; global basin {basin['momentum']:.3f} vs {basin['sgd']:.3f}",
        "criterion": "momentum's loss curve is smoother, its validation accuracy is higher "
        "by over 2 paired standard errors at some learning rate, and no measure (accuracy "
        "at any rate, global basin) goes against it by over 2 standard errors",
        "numbers": {
            "seeds": seeds,
            "steps": steps,
            "batch": 16,
            "roughness_sgd": _round(rough["sgd"]),
            "roughness_momentum": _round(rough["momentum"]),
            "roughness_learning_rate": curve_rate,
            "by_learning_rate": by_rate,
            "rugged_starts": starts,
            "global_basin_fraction_sgd": _round(basin["sgd"]),
            "global_basin_fraction_momentum": _round(basin["momentum"]),
            "global_basin_difference_se": _round(se),
            "big_rock_verdict": rock_verdict,
        },
        "series": {
            f"{name}_lr{curve_rate}_seed0_{key}": runs[name, curve_rate][0][key]
            for name in ("sgd", "momentum")
            for key in ("curve", "update_to_weight")
        },
        "figures": [
            _line(
                f"Probe: update-to-weight ratio per step at lr={curve_rate}",
                "step",
                "RMS(Δθ) / RMS(θ)  (log; rule of thumb ≈ 1e-3)",
                [
                    _series(
                        "SGD (β=0)", runs["sgd", curve_rate][0]["update_to_weight"]
                    ),
                    _series(
                        "momentum (β=0.9)",
                        runs["momentum", curve_rate][0]["update_to_weight"],
                    ),
                ],
                logy=True,
            ),
            _line(
                f"Full training loss per step at lr={curve_rate}, equal effective step",
                "step",
                "training loss (log; lower is better)",
                [
                    _series("SGD (β=0)", runs["sgd", curve_rate][0]["curve"]),
                    _series(
                        "momentum (β=0.9)", runs["momentum", curve_rate][0]["curve"]
                    ),
                ],
                logy=True,
            ),
            _line(
                "Validation accuracy against learning rate (mean over seeds)",
                "learning rate α (log)",
                "validation accuracy (higher is better)",
                [
                    _series(
                        "SGD (β=0)", [r["val_accuracy_sgd"] for r in by_rate], rates
                    ),
                    _series(
                        "momentum (β=0.9)",
                        [r["val_accuracy_momentum"] for r in by_rate],
                        rates,
                    ),
                ],
                logx=True,
            ),
            {
                "type": "bar",
                "title": "Runs ending in the global basin of a rippled bowl",
                "ylabel": "fraction of starts (higher is better)",
                "labels": ["SGD (β=0)", "momentum (β=0.9)"],
                "values": [basin["sgd"], basin["momentum"]],
                "errors": [se / math.sqrt(2)] * 2,
            },
        ],
    }


# -- C3 ---------------------------------------------------------------------------------


def claim_adam_small_v(ctx: Context) -> dict[str, Any]:
    data = ctx.data
    steps = ctx.pick(300, 800)
    activity = (data.x_train != 0).double().mean(0)  # how often each input is non-zero
    level = data.x_train.abs().double().mean(0)
    alive = activity > 0  # inputs that are always 0 get no gradient under any optimizer
    lo, hi = torch.quantile(
        level[alive], torch.tensor([0.25, 0.75], dtype=torch.float64)
    )
    rare, common = alive & (level <= lo), alive & (level >= hi)

    movement, final_opt = {}, None
    for name in ("adam", "sgd"):
        net = mlp(data, hidden=64, p_drop=0.0, seed=ctx.seed + 400, depth=1)
        first = net[0].weight
        start = first.detach().clone()
        opt = (
            optiscope.Adam(net.named_parameters(), lr=1e-3, probe=True)
            if name == "adam"
            else optiscope.Momentum(net.parameters(), lr=0.1, momentum=0.0)
        )
        train(net, opt, data, steps=steps, batch=32, seed=ctx.seed + 401)
        movement[name] = (
            (first.detach() - start).abs().mean(0).double()
        )  # per input feature
        if name == "adam":
            final_opt, adam_net = opt, net
        ctx.advance(0.4 if name == "adam" else 0.8)

    ratio = {k: (m[rare].mean() / m[common].mean()).item() for k, m in movement.items()}
    rho = {
        k: float(spearmanr(level[alive], m[alive]).statistic)
        for k, m in movement.items()
    }

    # Effective step per coordinate, read from the optimizer and checked on a real step.
    weight = adam_net[0].weight
    state = final_opt.state[weight]
    t = int(state["step"].item())
    beta1, beta2 = final_opt.param_groups[0]["betas"]
    lr, eps = final_opt.param_groups[0]["lr"], final_opt.param_groups[0]["eps"]
    adam_net.train()
    adam_net.zero_grad()
    nn.functional.cross_entropy(adam_net(data.x_train), data.y_train).backward()
    before = weight.detach().clone()
    m_next = beta1 * state["exp_avg"] + (1 - beta1) * weight.grad
    v_next = beta2 * state["exp_avg_sq"] + ((1 - beta2) * weight.grad) * weight.grad
    final_opt.step()
    c1, c2 = rules.bias_corrections(beta1, beta2, t + 1)
    m_hat = m_next / c1
    v_hat = (v_next / c2).double()
    predicted = rules.effective_step(lr, v_hat, eps)
    usable = m_hat.abs() > 1e-6
    measured = ((before - weight.detach()).abs() / m_hat.abs()).double()
    deviation = ((measured[usable] / predicted[usable]) - 1).abs().median().item()
    rho_step = float(
        spearmanr(v_hat[usable].flatten(), measured[usable].flatten()).statistic
    )
    probed = final_opt.probes["params"]["0.weight"]  # the same step, measured in-pass
    ctx.advance(1.0)

    sample = torch.nonzero(usable.flatten()).flatten()[
        :: max(1, int(usable.sum()) // 400)
    ]
    v_points, s_points = v_hat.flatten()[sample], measured.flatten()[sample]
    order = torch.argsort(v_points)
    verdict = HOLDS if rho_step < -0.99 and ratio["adam"] > 2 * ratio["sgd"] else FAILS
    return {
        "verdict": verdict,
        "headline": f"ρ(v̂, step) = {rho_step:.4f}; rare/common movement "
        f"Adam {ratio['adam']:.3f} vs SGD {ratio['sgd']:.3f}",
        "criterion": "measured step |Δθ|/|m̂| falls with v̂ (Spearman < −0.99), and "
        "rarely active inputs' weights move, relative to common ones, over 2× more "
        "under Adam than under SGD",
        "numbers": {
            "rare_inputs": int(rare.sum()),
            "common_inputs": int(common.sum()),
            "never_active_inputs": int((~alive).sum()),
            "movement_ratio_rare_over_common_adam": _round(ratio["adam"]),
            "movement_ratio_rare_over_common_sgd": _round(ratio["sgd"]),
            "spearman_input_level_vs_movement_adam": _round(rho["adam"]),
            "spearman_input_level_vs_movement_sgd": _round(rho["sgd"]),
            "spearman_v_hat_vs_effective_step": _round(rho_step),
            "median_relative_deviation_from_alpha_over_sqrt_v_plus_eps": _round(
                deviation
            ),
            "probe_effective_step_min": _round(probed["step_min"]),
            "probe_effective_step_median": _round(probed["step_median"]),
            "probe_effective_step_max": _round(probed["step_max"]),
            "predicted_effective_step_min": _round(predicted.min().item()),
            "predicted_effective_step_max": _round(predicted.max().item()),
            "probe_eps_dominated_fraction": _round(probed["eps_dominated_fraction"]),
        },
        "figures": [
            {
                "type": "scatter",
                "title": "Adam's per-coordinate step against v̂ (first layer)",
                "xlabel": "v̂ (running mean of g², bias-corrected)",
                "ylabel": "effective step |Δθ| / |m̂|",
                "logx": True,
                "logy": True,
                "points": [
                    {
                        "label": "measured",
                        "x": v_points[order].tolist(),
                        "y": s_points[order].tolist(),
                    }
                ],
                "series": [
                    _series(
                        "α/(√v̂+ε)",
                        rules.effective_step(lr, v_points[order], eps).tolist(),
                        v_points[order].tolist(),
                    )
                ],
            },
            {
                "type": "scatter",
                "title": "How far each input's first-layer weights move",
                "xlabel": "mean input level (rarely active → commonly active)",
                "ylabel": "mean |Δw| over hidden units",
                "logy": True,
                "points": [
                    {
                        "label": name,
                        "x": level[alive].tolist(),
                        "y": movement[name][alive].tolist(),
                    }
                    for name in ("adam", "sgd")
                ],
            },
        ],
    }


# -- shared by C4–C6: nets trained with and without dropout --------------------------------

_NETS: dict[tuple, nn.Module] = {}
_KEEP_RATES: dict[tuple, tuple[float, int]] = {}  # keep rate seen by the probes, units


def _trained(ctx: Context, p: float, seed: int, gamma_one: bool = False) -> nn.Module:
    """An MLP trained with dropout p (memoised within one run; deterministic)."""
    key = (ctx.data.sha256, ctx.quick, p, seed, gamma_one)
    if key not in _NETS:
        net = mlp(ctx.data, hidden=256, p_drop=p, seed=seed)
        if gamma_one:  # classic, non-inverted dropout: keep d∘h, no 1/(1−p)
            for i, layer in enumerate(net):
                if isinstance(layer, optiscope.Dropout):
                    net[i] = _UnscaledDropout(p)
        probes = optiscope.probe(net) if 0 < p < 1 and not gamma_one else []
        opt = optiscope.Adam(net.parameters(), lr=1e-3)
        train(net, opt, ctx.data, steps=ctx.pick(500, 1500), batch=32, seed=seed + 1)
        kept = sum(
            r["modules"][pr.name]["keep_rate"] * r["modules"][pr.name]["numel"]
            for pr in probes
            for r in pr.history.records
        )
        seen = sum(
            r["modules"][pr.name]["numel"] for pr in probes for r in pr.history.records
        )
        optiscope.probes.remove(net)  # Monte-Carlo passes later run dropout on purpose
        _NETS[key] = net
        _KEEP_RATES[key] = (kept / seen if seen else math.nan, seen)
    return _NETS[key]


def _observed_keep_rate(ctx: Context, p: float, seed: int) -> tuple[float, int]:
    """What the Dropout probes saw while :func:`_trained` trained that net."""
    _trained(ctx, p, seed)
    return _KEEP_RATES[(ctx.data.sha256, ctx.quick, p, seed, False)]


class _UnscaledDropout(nn.Module):
    """γ = 1: the seed's h_drop with the scale left out, as a counterfactual."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        return dropout(h, self.p) * (1 - self.p)


# -- C4 ---------------------------------------------------------------------------------


def claim_dropout_expectation(ctx: Context) -> dict[str, Any]:
    net = _trained(ctx, 0.5, ctx.seed + 500)
    with torch.no_grad():
        h = net[1](net[0](ctx.data.x_val)).double()  # first hidden layer, after ReLU
    draws = ctx.pick(100, 400)
    torch.manual_seed(ctx.seed + 501)
    ps = [0.1, 0.3, 0.5, 0.7, 0.9]
    rows = []
    positive = h > 0
    for i, p in enumerate(ps):
        total = torch.zeros_like(h)
        for _ in range(draws):
            total += dropout(h, p)
        mean = total / draws
        se = h * math.sqrt(p / ((1 - p) * draws))
        z = (mean - h)[positive] / se[positive]
        aggregate_se = (
            math.sqrt((h**2).sum().item() * p / ((1 - p) * draws)) / h.sum().item()
        )
        rows.append(
            {
                "p": p,
                "mean_ratio_inverted": mean.sum().item() / h.sum().item(),
                "aggregate_standard_error": aggregate_se,
                "mean_ratio_gamma_one": (mean * (1 - p)).sum().item() / h.sum().item(),
                "fraction_abs_z_over_1.96": (z.abs() > 1.96).double().mean().item(),
            }
        )
        ctx.advance(0.6 * (i + 1) / len(ps))

    # What γ = 1 does to evaluation: a net trained with unscaled dropout, evaluated without.
    classic = _trained(ctx, 0.5, ctx.seed + 500, gamma_one=True)
    with torch.no_grad():
        classic.train()
        torch.manual_seed(ctx.seed + 502)
        train_mode = torch.stack(
            [classic[2](classic[1](classic[0](ctx.data.x_val))) for _ in range(20)]
        ).mean(0)
        classic.eval()
        eval_mode = classic[2](classic[1](classic[0](ctx.data.x_val)))
    shift = (eval_mode.sum() / train_mode.sum()).item()
    acc_inverted = accuracy(net, ctx.data.x_val, ctx.data.y_val)
    acc_classic = accuracy(classic, ctx.data.x_val, ctx.data.y_val)
    ctx.advance(1.0)

    ok = all(
        abs(r["mean_ratio_inverted"] - 1) <= 4 * r["aggregate_standard_error"]
        for r in rows
    )
    ok = ok and all(abs(r["fraction_abs_z_over_1.96"] - 0.05) < 0.03 for r in rows)
    # The Dropout probes counted the kept units of every training pass: Binomial(n, 1-p).
    keep_rate, units_seen = _observed_keep_rate(ctx, 0.5, ctx.seed + 500)
    keep_sigma = math.sqrt(0.25 / units_seen)
    ok = ok and abs(keep_rate - 0.5) <= 4 * keep_sigma
    worst = max(rows, key=lambda r: abs(r["mean_ratio_inverted"] - 1))
    return {
        "verdict": HOLDS if ok else FAILS,
        "headline": f"E[h_drop]/h within {abs(worst['mean_ratio_inverted'] - 1):.1e} of 1 "
        f"(p={worst['p']}, SE {worst['aggregate_standard_error']:.1e}); γ=1 shifts eval "
        f"×{shift:.3f}",
        "criterion": "E[h_drop]/h within 4 CLT standard errors of 1 for every p, the "
        "per-unit z-scores exceed 1.96 about 5% of the time (±3 points), and the keep "
        "rate the Dropout probes saw in training is within 4σ of 1 − p",
        "numbers": {
            "draws_per_unit": draws,
            "units": int(positive.sum()),
            "by_p": [{k: _round(v) for k, v in r.items()} for r in rows],
            "gamma_one_eval_over_train_activation": _round(shift),
            "gamma_one_predicted_shift": 2.0,
            "val_accuracy_inverted_dropout": _round(acc_inverted),
            "val_accuracy_gamma_one_unrescaled": _round(acc_classic),
            "probe_keep_rate_in_training_p0.5": _round(keep_rate),
            "probe_keep_rate_sigma": _round(keep_sigma),
            "probe_units_seen": units_seen,
        },
        "figures": [
            _line(
                "Mean activation after dropout, relative to h",
                "drop probability p",
                "E[h_drop] / h  (1 keeps the expectation)",
                [
                    _series(
                        "γ = 1/(1−p) (inverted)",
                        [r["mean_ratio_inverted"] for r in rows],
                        ps,
                    ),
                    _series("γ = 1", [r["mean_ratio_gamma_one"] for r in rows], ps),
                    _series("1 − p", [1 - p for p in ps], ps),
                ],
            ),
        ],
    }


# -- C5 ---------------------------------------------------------------------------------


def claim_no_dropout_at_eval(ctx: Context) -> dict[str, Any]:
    net = _trained(ctx, 0.5, ctx.seed + 500)
    x = ctx.data.x_val
    net.eval()
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        first, second = net(x), net(x)
    deterministic = bool(torch.equal(first, second))
    rng_untouched = bool(torch.equal(rng_before, torch.get_rng_state()))
    ctx.advance(0.3)

    disagreement = {}
    torch.manual_seed(ctx.seed + 600)
    for i, p in enumerate((0.2, 0.5)):
        model = _trained(ctx, p, ctx.seed + 500 + (p != 0.5))
        model.train()
        with torch.no_grad():
            a, b = model(x).argmax(1), model(x).argmax(1)
        model.eval()
        disagreement[p] = (a != b).double().mean().item()
        ctx.advance(0.3 + 0.35 * (i + 1))
    verdict = (
        HOLDS if deterministic and rng_untouched and disagreement[0.5] > 0 else FAILS
    )
    return {
        "verdict": verdict,
        "headline": f"eval bitwise equal: {deterministic}, RNG untouched: {rng_untouched}; "
        f"train-mode disagreement {disagreement[0.5]:.3f} at p=0.5",
        "criterion": "in eval mode two passes are bitwise equal and the RNG state is "
        "untouched; in training mode two passes disagree on some inputs",
        "numbers": {
            "eval_outputs_bitwise_equal": deterministic,
            "eval_rng_state_untouched": rng_untouched,
            "train_mode_disagreement_rate_p0.2": _round(disagreement[0.2]),
            "train_mode_disagreement_rate_p0.5": _round(disagreement[0.5]),
            "validation_inputs": len(x),
        },
        "figures": [
            {
                "type": "bar",
                "title": "Two stochastic passes predict differently",
                "ylabel": "fraction of validation inputs (eval mode: 0)",
                "labels": ["eval mode", "train mode p=0.2", "train mode p=0.5"],
                "values": [
                    float(not deterministic),
                    disagreement[0.2],
                    disagreement[0.5],
                ],
            },
        ],
    }


# -- C6 ---------------------------------------------------------------------------------


def claim_ensemble(ctx: Context) -> dict[str, Any]:
    data = ctx.data
    seeds = ctx.pick(2, 4)
    ks = [1, 10, 50]
    mc = {k: [] for k in ks}
    deterministic, gap = [], {"dropout": [], "none": []}
    train_accuracy = {"dropout": [], "none": []}
    for i in range(seeds):
        seed = ctx.seed + 500 + 10 * i
        net = _trained(ctx, 0.5, seed)
        deterministic.append(accuracy(net, data.x_val, data.y_val))
        for k in ks:
            mc[k].append(monte_carlo_accuracy(net, data.x_val, data.y_val, k, seed + k))
        plain = _trained(ctx, 0.0, seed)
        for name, model in (("dropout", net), ("none", plain)):
            train_accuracy[name].append(accuracy(model, data.x_train, data.y_train))
            gap[name].append(
                train_accuracy[name][-1] - accuracy(model, data.x_val, data.y_val)
            )
        ctx.advance((i + 1) / seeds)
    det = float(np.mean(deterministic))
    mc_mean = {k: float(np.mean(v)) for k, v in mc.items()}
    gaps = {k: float(np.mean(v)) for k, v in gap.items()}
    n_val = len(data.y_val)
    tolerance = 2 * math.sqrt(det * (1 - det) / (n_val * seeds)) + 1 / n_val
    ensemble_ok = abs(det - mc_mean[50]) <= tolerance and mc_mean[1] <= det
    # Paired over seeds: does dropout change the train-validation gap beyond noise?
    gap_diff = np.array(gap["dropout"]) - np.array(gap["none"])
    gap_se = float(gap_diff.std(ddof=1) / math.sqrt(seeds)) if seeds > 1 else math.inf
    # A difference smaller than one validation example is no difference at all.
    gap_margin = max(2 * gap_se, 1 / n_val)
    gap_widened = gap_diff.mean() > gap_margin
    gap_narrowed = gap_diff.mean() < -gap_margin
    verdict = FAILS if not ensemble_ok else (UNCLEAR if gap_widened else HOLDS)
    effect = (
        "narrows" if gap_narrowed else "widens" if gap_widened else "does not change"
    )
    fit = {k: float(np.mean(v)) for k, v in train_accuracy.items()}
    return {
        "verdict": verdict,
        "note": f"Dropout {effect} the train–validation gap beyond noise here "
        f"({gap_diff.mean():+.4f} ± {gap_se:.4f} over {seeds} seeds). Training "
        f"accuracy is {fit['dropout']:.4f} with dropout and {fit['none']:.4f} without: "
        "where both nets fit the training set, there is little gap for dropout to "
        "close, and the ensemble shows in weight scaling matching the Monte-Carlo "
        "average.",
        "headline": f"accuracy: eval {det:.4f}, MC k=1 {mc_mean[1]:.4f}, k=50 "
        f"{mc_mean[50]:.4f}; gap {gaps['dropout']:.4f} with dropout, "
        f"{gaps['none']:.4f} without",
        "criterion": "weight-scaled evaluation matches the 50-pass Monte-Carlo ensemble "
        "within 2 binomial standard errors and beats a single stochastic pass, and "
        "dropout does not widen the train–validation gap by more than 2 paired "
        "standard errors (or one validation example)",
        "numbers": {
            "seeds": seeds,
            "val_accuracy_deterministic": _round(det),
            **{f"val_accuracy_mc_k{k}": _round(v) for k, v in mc_mean.items()},
            "tolerance": _round(tolerance),
            "train_val_gap_with_dropout": _round(gaps["dropout"]),
            "train_val_gap_without_dropout": _round(gaps["none"]),
            "gap_difference_dropout_minus_none": _round(float(gap_diff.mean())),
            "gap_difference_se": _round(gap_se),
        },
        "figures": [
            {
                "type": "bar",
                "title": "Validation accuracy: one net evaluated four ways",
                "ylabel": "accuracy (higher is better)",
                "labels": ["deterministic (eval)"] + [f"MC k={k}" for k in ks],
                "values": [det] + [mc_mean[k] for k in ks],
                "ylim": "auto",
            },
            {
                "type": "bar",
                "title": "Train − validation accuracy gap",
                "ylabel": "gap (lower generalises better)",
                "labels": ["no dropout", "dropout p=0.5"],
                "values": [gaps["none"], gaps["dropout"]],
            },
        ],
    }


CLAIMS: dict[str, Claim] = {
    c.key: c
    for c in [
        Claim(
            "C1",
            "Momentum lowers the variance of updates",
            "when we use momentum, only (1 − β1)·∇J contributed to the change, another part "
            "β1 comes from last gradient/change",
            "At a frozen θ, one stream of i.i.d. minibatch gradients feeds plain SGD, EMA "
            "momentum and torch's summing buffer, and we compare the variance of their "
            "updates; then we repeat inside short windows of real training.",
            claim_momentum_variance,
            needs_digits=True,
        ),
        Claim(
            "C2",
            "Low variance helps learning",
            "a big rock … is not that sensitive to the ups and downs (high momentum) and "
            "is more likely to reach the global optimum",
            "SGD and EMA momentum train the same nets at the same effective step over "
            "several seeds; separately, thousands of noisy 1-D descents on a rippled bowl "
            "count how often each ends in the global basin.",
            claim_low_variance_helps,
            needs_digits=True,
        ),
        Claim(
            "C3",
            "Adam gives larger steps to parameters with a small v",
            "θ_i with smaller v_i, i.e. smaller rolling average of gradient magnitudes … "
            "will get larger updates",
            "We read v̂ from Adam's state and measure each coordinate's real step; then we "
            "compare how far the first-layer weights of rarely and commonly active inputs "
            "move under Adam and under SGD.",
            claim_adam_small_v,
        ),
        Claim(
            "C4",
            "γ = 1/(1−p) keeps the expectation",
            "E[h_drop]_i = γ h_i (1 − P_drop) = h_i ⇒ γ = 1/(1 − P_drop)",
            "We apply optiscope's dropout many times to a trained net's hidden activations "
            "and compare the mean with h against CLT standard errors; then we show what "
            "γ = 1 does.",
            claim_dropout_expectation,
        ),
        Claim(
            "C5",
            "No dropout at evaluation",
            "we don't want to randomly drop some neurons during evaluation which will lead "
            "to inconsistent results in same input",
            "We run a trained net twice in eval mode and compare outputs and RNG state; "
            "then we count how often two training-mode passes disagree.",
            claim_no_dropout_at_eval,
        ),
        Claim(
            "C6",
            "The trained network acts as an ensemble",
            'we already have an "ensembled" model',
            "We compare deterministic (weight-scaled) evaluation with Monte-Carlo averages "
            "of k stochastic passes, and the train–validation gap with and without dropout.",
            claim_ensemble,
        ),
    ]
}
