"""The dropout findings: ``forgotten_eval`` (a Dropout layer run in training
mode with gradients off) and ``keep_rate`` (an observed keep rate outside its
binomial bounds)."""

from __future__ import annotations

from .finding import Finding, _finding
from .records import _Run, _z
from .thresholds import KEEP_Z_CALL, KEEP_Z_POOLED


def _module_findings(run: _Run) -> list[Finding]:
    out = []
    for name, m in run.modules.items():
        if m.no_grad_count:
            out.append(
                _finding(
                    run,
                    code="forgotten_eval",
                    severity="warning",
                    title="dropout active under no_grad",
                    scope=name,
                    parameters=(name,),
                    steps=(m.no_grad_steps[0], m.no_grad_steps[-1]),
                    evidence={
                        "calls": m.no_grad_count,
                        "first_calls": list(m.no_grad_steps),
                    },
                    threshold="a Dropout call in training mode with gradients off",
                    basis="evaluation under torch.no_grad without model.eval() "
                    "drops units: its outputs are noisy and its accuracy lower",
                    action="call model.eval() before evaluating (and model.train() "
                    "after); ignore if it is Monte-Carlo dropout on purpose",
                )
            )
        if m.seen and m.expected is not None:
            rate = m.kept / m.seen
            z = _z(rate, m.expected, m.seen)
            worst, at = m.worst
            if abs(z) > KEEP_Z_POOLED or abs(worst) > KEEP_Z_CALL:
                out.append(
                    _finding(
                        run,
                        code="keep_rate",
                        severity="error",
                        title="keep rate outside its binomial bounds",
                        scope=name,
                        parameters=(name,),
                        steps=(m.first_step, m.last_step),
                        evidence={
                            "keep_rate": rate,
                            "expected": m.expected,
                            "units": m.seen,
                            "z": z,
                            "worst_call_z": worst,
                            "worst_call": at,
                        },
                        threshold=f"|z| > {KEEP_Z_POOLED:g} over all calls or > "
                        f"{KEEP_Z_CALL:g} in one, z = (kept/n − (1−p)) / "
                        "√(p(1−p)/n)",
                        basis="each unit is kept with probability 1 − p "
                        "independently, so kept/n has standard deviation "
                        "√(p(1−p)/n); a 5σ deviation happens by chance with "
                        "probability 6e-7",
                        action="the mask is not Bernoulli(1 − p): check that p was "
                        "not changed mid-run and that the generator is seeded "
                        "correctly; report it if not",
                    )
                )
    return out
