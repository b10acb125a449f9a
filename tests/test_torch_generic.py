"""PyTorch's generic optimizer tests, restated for optiscope.

torch checks every optimizer in ``torch.optim`` with one class of generic tests,
``TestOptimRenewed`` in its ``test/test_optim.py``, driven by the ``OptimizerInfo``
entries (``optim_db``) of ``torch.testing._internal.common_optimizers``. This file
builds entries of the same kind for ``optiscope.Adam``, ``optiscope.AdamW`` and
``optiscope.Momentum`` out of torch's own Adam, AdamW and SGD entries, and checks
the behaviours those tests check that apply on CPU. Each test says which torch
test it mirrors.

Where the update rule is the same, trajectories are also compared with torch's
optimizers: Adam and AdamW option for option, Momentum with SGD through the exact
mapping ``Momentum(lr=α, momentum=β) ≡ SGD(lr=α(1−β), momentum=β, dampening=0)``.
"""

import inspect
import io
from copy import deepcopy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal import common_optimizers

import optiscope

# torch's optimizer database; its module needs expecttest and hypothesis, which
# the test extra installs. (Importing it also freezes torch.backends flags, as
# torch's own suite wants; optiscope sets none.)
_common_optimizers = common_optimizers
ErrorOptimizerInput = _common_optimizers.ErrorOptimizerInput
OptimizerErrorEnum = _common_optimizers.OptimizerErrorEnum
OptimizerInfo = _common_optimizers.OptimizerInfo
OptimizerInput = _common_optimizers.OptimizerInput
optim_db = _common_optimizers.optim_db


# -- building our OptimizerInfo entries from torch's ------------------------------------

#: torch's switches that optiscope has nothing to select with. optiscope has one
#: implementation and it is always fused (one pass over all tensors of a group), so
#: ``foreach`` and ``fused`` choose nothing; ``capturable`` (CUDA-graph capture) and
#: ``differentiable`` (autograd through ``step``) are torch-only features. Dropping
#: them leaves the update rule the input describes.
TORCH_ONLY_FLAGS = ("foreach", "fused", "capturable", "differentiable")

SGD_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(torch.optim.SGD.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def _torch_entry(name):
    return next(info for info in optim_db if info.optim_cls.__name__ == name)


def _without_torch_only_flags(kwargs):
    return {k: v for k, v in kwargs.items() if k not in TORCH_ONLY_FLAGS}


def _adam_from_torch(kwargs):
    """torch Adam/AdamW options → optiscope Adam/AdamW options: the same names."""
    return _without_torch_only_flags(kwargs), None


def _momentum_from_sgd(kwargs):
    """torch SGD options → optiscope Momentum options, or None and why not."""
    if kwargs.get("nesterov", False):
        return None, "nesterov=True: Momentum has no Nesterov variant"
    if kwargs.get("dampening", 0) != 0:
        return None, (
            "dampening != 0: Momentum's average is SGD's undamped buffer times "
            "(1 - momentum); other dampening has no Momentum equivalent"
        )
    translated = _without_torch_only_flags(kwargs)
    translated.pop("nesterov", None)
    translated.pop("dampening", None)
    beta = translated.get("momentum", SGD_DEFAULTS["momentum"])
    lr = translated.get("lr", SGD_DEFAULTS["lr"])
    translated["momentum"] = beta
    # Exact mapping: SGD(lr=α(1−β), momentum=β) ≡ Momentum(lr=α, momentum=β).
    # An out-of-range β (error inputs) keeps its lr: construction must refuse it.
    translated["lr"] = lr / (1 - beta) if 0 <= beta < 1 else lr
    return translated, None


def _is_float_tensor_mix(pair):
    return isinstance(pair, tuple) and len({torch.is_tensor(b) for b in pair}) == 2


def _error_skip_reason(kwargs):
    """Why a torch error input does not apply to optiscope, or None if it does."""
    flags = [f for f in TORCH_ONLY_FLAGS if kwargs.get(f)]
    if flags:
        return f"the error is about torch's {'/'.join(flags)} implementation"
    if _is_float_tensor_mix(kwargs.get("betas")):
        return (
            "optiscope reads each beta as a number (a 1-element tensor included), "
            "so a float/tensor mix is well defined"
        )
    return None


@dataclass
class Entry:
    """Our OptimizerInfo for one optiscope class, and the torch entry it came from."""

    name: str
    torch_info: OptimizerInfo
    translate: object
    info: OptimizerInfo = None


@dataclass
class Case:
    """One translated torch input: optiscope's kwargs, and torch's for the same rule."""

    entry: Entry
    desc: str
    kwargs: dict
    torch_kwargs: dict

    def make(self, params, **overrides):
        kwargs = {**deepcopy(self.kwargs), **overrides}
        return self.entry.info.optim_cls(params, **kwargs)

    def make_torch(self, params, **impl):
        """torch's optimizer with the same rule; ``impl`` picks its implementation."""
        kwargs = {**deepcopy(self.torch_kwargs), **impl}
        return self.entry.torch_info.optim_cls(params, **kwargs)

    @property
    def maximize(self):
        return self.kwargs.get("maximize", False)

    def torch_state_as_ours(self, key, value):
        """torch's state entry in optiscope's convention (SGD's buffer is m/(1−β);
        the state of a float16 parameter is float32)."""
        if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
            value = value.float()
        if key == "momentum_buffer" and value is not None:
            return value * (1 - self.kwargs["momentum"])
        return value


def translated_inputs(entry):
    """(desc, Case or None, why not) for each of torch's CPU inputs for the entry."""
    rows = []
    for torch_input in entry.torch_info.optim_inputs_func(device="cpu"):
        kwargs, reason = entry.translate(torch_input.kwargs)
        torch_kwargs = _without_torch_only_flags(torch_input.kwargs)
        case = (
            None
            if kwargs is None
            else Case(entry, torch_input.desc, kwargs, torch_kwargs)
        )
        rows.append((torch_input.desc, case, reason))
    return rows


def translated_error_inputs(entry):
    """(desc, ErrorOptimizerInput or None, why not) for torch's CPU error inputs."""
    rows = []
    for error_input in entry.torch_info.optim_error_inputs_func(
        device="cpu", dtype=torch.float32
    ):
        torch_input = error_input.optimizer_error_input
        reason = _error_skip_reason(torch_input.kwargs)
        ours = None
        if reason is None:
            kwargs, reason = entry.translate(torch_input.kwargs)
            ours = ErrorOptimizerInput(
                OptimizerInput(torch_input.params, kwargs, desc=torch_input.desc),
                error_on=error_input.error_on,
                error_type=error_input.error_type,
                error_regex=error_input.error_regex,
            )
        rows.append((torch_input.desc, ours, reason))
    return rows


def _make_entry(optim_cls, torch_name, translate):
    entry = Entry(optim_cls.__name__, _torch_entry(torch_name), translate)

    def optim_inputs_func(device, dtype=None):
        return [
            OptimizerInput(None, case.kwargs, desc=case.desc)
            for _, case, _ in translated_inputs(entry)
            if case is not None
        ]

    def optim_error_inputs_func(device, dtype):
        return [e for _, e, _ in translated_error_inputs(entry) if e is not None]

    ours = set(inspect.signature(optim_cls.__init__).parameters)
    theirs = set(inspect.signature(entry.torch_info.optim_cls.__init__).parameters)
    entry.info = OptimizerInfo(
        optim_cls,
        optim_inputs_func=optim_inputs_func,
        optim_error_inputs_func=optim_error_inputs_func,
        scheduler_inputs=entry.torch_info.scheduler_inputs,
        supported_impls=(),
        supports_fused_on=(),
        # Group keys that an older checkpoint, or torch's own optimizer, may lack.
        not_og_supported_flags=tuple(
            sorted(
                set(entry.torch_info.not_og_supported_flags)
                | (ours - theirs - {"self", "params", "probe"})
            )
        ),
        supports_sparse=False,
        supports_complex=False,  # optiscope updates real floating-point tensors only
        has_capturable_arg=False,
    )
    return entry


ENTRIES = [
    _make_entry(optiscope.Adam, "Adam", _adam_from_torch),
    _make_entry(optiscope.AdamW, "AdamW", _adam_from_torch),
    _make_entry(optiscope.Momentum, "SGD", _momentum_from_sgd),
]
ENTRY_PARAMS = [pytest.param(entry, id=entry.name) for entry in ENTRIES]


def _param_id(entry, desc):
    return f"{entry.name}-{desc.replace(' ', '_')}"


def case_params(skip_if=None):
    """Every torch input of every entry: its Case, or a skip that says why."""
    params = []
    for entry in ENTRIES:
        for desc, case, reason in translated_inputs(entry):
            if case is not None and skip_if is not None:
                reason = skip_if(case)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(case, id=_param_id(entry, desc), marks=marks))
    return params


def error_params():
    """Every torch error input of every entry, by index, or a skip that says why."""
    params = []
    with torch.random.fork_rng():  # torch's error inputs draw random parameters
        for entry in ENTRIES:
            for index, (desc, error_input, reason) in enumerate(
                translated_error_inputs(entry)
            ):
                marks = [] if error_input else [pytest.mark.skip(reason=reason)]
                params.append(
                    pytest.param(entry, index, id=_param_id(entry, desc), marks=marks)
                )
    return params


CASES = case_params()


# -- shared problems and comparisons ----------------------------------------------------


def _linear_problem(contiguous=True, dtype=torch.float32):
    """torch's small least-squares problem: weight (10, 5), bias (10), input (5)."""
    if contiguous:
        weight = Parameter(torch.randn(10, 5, dtype=dtype))
        bias = Parameter(torch.randn(10, dtype=dtype))
    else:
        weight = Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def _squared_loss(weight, bias, x):
    return (weight.mv(x) + bias).pow(2).sum()


def _closure(optimizer, weight, bias, x):
    def closure():
        optimizer.zero_grad()
        loss = _squared_loss(weight, bias, x)
        loss.backward()
        return loss

    return closure


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_param_names(state_dict):
    state_dict = deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def assert_identical(actual, expected, path="state_dict"):
    """Same structure, same keys, same types, bitwise-equal tensors."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {actual!r} is not a tensor"
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), (
            f"{path}: {actual.dtype}{tuple(actual.shape)} != "
            f"{expected.dtype}{tuple(expected.shape)}"
        )
        assert torch.equal(actual, expected), f"{path}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: {actual!r} is not a dict"
        extra = sorted(map(str, set(actual) - set(expected)))
        missing = sorted(map(str, set(expected) - set(actual)))
        assert not extra and not missing, (
            f"{path}: extra keys {extra}, missing {missing}"
        )
        for key, value in expected.items():
            assert_identical(actual[key], value, f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{path}: {actual!r} vs {expected!r}"
        assert len(actual) == len(expected), f"{path}: {actual!r} vs {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{path}[{i}]")
    else:
        assert type(actual) is type(expected), f"{path}: {actual!r} vs {expected!r}"
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def _tiny_model(dtype=torch.float32):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid())
    return model.to(dtype)


def _conv_bn_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2))


def _rosenbrock_grad(xy):
    x, y = xy
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


def _assert_state_matches_torch(case, optimizer, params, reference, ref_params, tol):
    """optiscope's per-parameter state equals torch's (in optiscope's convention)."""
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        for key, value in reference.state[q].items():
            expected = case.torch_state_as_ours(key, value)
            if expected is None:
                continue
            torch.testing.assert_close(
                optimizer.state[p][key],
                expected,
                **tol,
                msg=lambda m, i=i, key=key: f"state[param {i}][{key!r}]: {m}",
            )


# -- the translation itself ---------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_PARAMS)
def test_optim_infos_do_not_specify_global_cliquey_kwargs(entry):
    """Mirrors test_optim_infos_do_not_specify_global_cliquey_kwargs: our entries carry
    no torch-only implementation flag, and every torch input is kept or skipped with a reason."""
    inputs = entry.info.optim_inputs_func(device="cpu")
    for optim_input in inputs:
        assert not set(TORCH_ONLY_FLAGS) & set(optim_input.kwargs), optim_input.desc
        entry.info.optim_cls([Parameter(torch.randn(2))], **optim_input.kwargs)
    torch_descs = [i.desc for i in entry.torch_info.optim_inputs_func(device="cpu")]
    rows = translated_inputs(entry)
    assert [desc for desc, _, _ in rows] == torch_descs
    assert [i.desc for i in inputs] == [desc for desc, case, _ in rows if case]
    assert all(case or reason for _, case, reason in rows)


def test_momentum_translation_is_the_exact_sgd_mapping():
    """Our own check of the SGD → Momentum translation used by every Momentum case."""
    kwargs, _ = _momentum_from_sgd({"lr": 0.02, "momentum": 0.75, "foreach": True})
    assert kwargs == {"lr": 0.08, "momentum": 0.75}
    kwargs, _ = _momentum_from_sgd({})
    assert kwargs == {"lr": SGD_DEFAULTS["lr"], "momentum": SGD_DEFAULTS["momentum"]}
    assert _momentum_from_sgd({"momentum": 0.9, "nesterov": True})[0] is None
    assert _momentum_from_sgd({"momentum": 0.9, "dampening": 0.5})[0] is None


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "index"), error_params())
def test_errors(entry, index):
    """Mirrors test_errors: what torch refuses, optiscope refuses with the same
    exception type (or warning category); the message text may differ."""
    error_input = translated_error_inputs(entry)[index][1]
    optim_input = error_input.optimizer_error_input
    params = optim_input.params
    if params is None:
        # torch passes no parameters where the option alone is wrong; real ones make
        # sure the refusal is about the option, not about the missing parameters.
        params = [Parameter(torch.randn(2))]
    expected = error_input.error_type

    def construct_and_maybe_step():
        optimizer = entry.info.optim_cls(params, **optim_input.kwargs)
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            optimizer.step()

    if issubclass(expected, Warning):
        with pytest.warns(expected):
            construct_and_maybe_step()
        return
    try:
        construct_and_maybe_step()
    except expected:
        return
    except Exception as error:
        pytest.fail(
            f"torch raises {expected.__name__} ({error_input.error_regex!r}); "
            f"optiscope raised {type(error).__name__}: {error}"
        )
    pytest.fail(f"torch raises {expected.__name__}; optiscope raised nothing")


@pytest.mark.parametrize("entry", ENTRY_PARAMS)
def test_empty_parameter_list_is_refused(entry):
    """Mirrors torch.optim.Optimizer's empty-parameter-list error (ValueError)."""
    with pytest.raises(ValueError):
        entry.info.optim_cls([])


@pytest.mark.parametrize("entry", ENTRY_PARAMS)
def test_complex_params_are_refused(entry):
    """Mirrors test_complex / test_complex_2d. optiscope has no complex rule
    (supports_complex=False), so torch's view_as_real equivalence is skipped; we
    check instead that a complex parameter is refused before anything changes."""
    real = Parameter(torch.randn(3))
    complex_param = Parameter(torch.randn(3, dtype=torch.complex64))
    for p in (real, complex_param):
        p.grad = torch.randn_like(p)
    before = [real.detach().clone(), complex_param.detach().clone()]
    optimizer = entry.info.optim_cls([real, complex_param])
    with pytest.raises(TypeError):
        optimizer.step()
    assert torch.equal(real, before[0]) and torch.equal(complex_param, before[1])


# -- the update goes the right way ----------------------------------------------------------


@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "sched"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "noncontig"])
@pytest.mark.parametrize("case", CASES)
def test_forloop_goes_right_direction(case, contiguous, with_lrsched):
    """Mirrors test_forloop_goes_right_direction: 20 steps lower the loss (raise it
    when maximizing), with each of torch's LR scheduler combinations too."""
    combos = case.entry.info.scheduler_inputs if with_lrsched else [[]]
    for scheduler_makers in combos:
        weight, bias, x = _linear_problem(contiguous)
        optimizer = case.make([weight, bias])
        schedulers = [make(optimizer) for make in scheduler_makers]
        closure = _closure(optimizer, weight, bias, x)
        initial = closure().item()
        for _ in range(20):
            loss = closure()
            optimizer.step()
            for scheduler in schedulers:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(loss.item())
                else:
                    scheduler.step()
        final = closure().item()
        if case.maximize:
            assert final > initial, scheduler_makers
        else:
            assert final < initial, scheduler_makers


@pytest.mark.parametrize("entry", ENTRY_PARAMS)
def test_param_group_with_lrscheduler_goes_right_direction(entry):
    """Mirrors test_param_group_with_lrscheduler_goes_right_direction: two groups
    (one with its own lr) under each scheduler combination still lower the loss."""
    for scheduler_makers in entry.info.scheduler_inputs:
        weight, bias, x = _linear_problem()
        optimizer = entry.info.optim_cls(
            [{"params": [weight]}, {"params": [bias], "lr": 0.01}]
        )
        schedulers = [make(optimizer) for make in scheduler_makers]
        closure = _closure(optimizer, weight, bias, x)
        initial = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            for scheduler in schedulers:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(loss.item())
                else:
                    scheduler.step()
        assert closure().item() < initial, scheduler_makers


def _rosenbrock_params():
    params = []
    for entry in ENTRIES:
        info = entry.torch_info
        marks = []
        if not (info.supports_sparse or info.only_supports_sparse_grads):
            reason = (
                f"torch runs its Rosenbrock test only for optimizers that take sparse "
                f"gradients; torch.optim.{info.optim_cls.__name__} does not"
            )
            marks = [pytest.mark.skip(reason=reason)]
        params.append(pytest.param(entry, id=entry.name, marks=marks))
    return params


@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "sched"])
@pytest.mark.parametrize("entry", _rosenbrock_params())
def test_rosenbrock(entry, with_lrsched):
    """Mirrors test_rosenbrock_sparse with dense gradients (optiscope takes no
    sparse ones): with torch's own options and schedulers for that test
    (metadata_for_sparse), 1800 steps of cyclic coordinate descent on Rosenbrock
    end no farther from (1, 1), on the same path as torch's optimizer."""
    kwarg_updates, scheduler_makers = entry.torch_info.metadata_for_sparse
    kwargs, _ = entry.translate(kwarg_updates)
    start = torch.tensor([1.5, 1.5], dtype=torch.float64)
    solution = torch.tensor([1.0, 1.0], dtype=torch.float64)
    ours, theirs = Parameter(start.clone()), Parameter(start.clone())
    optimizers = [
        entry.info.optim_cls([ours], **kwargs),
        entry.torch_info.optim_cls([theirs], **kwarg_updates, foreach=False),
    ]
    schedulers = [
        make(opt)
        for opt in optimizers
        for make in (scheduler_makers if with_lrsched else [])
    ]
    for i in range(1800):
        for param, optimizer in zip((ours, theirs), optimizers, strict=True):
            grad = _rosenbrock_grad(param.detach())
            grad[i % 2] = 0.0  # only the x or only the y gradient, in turn
            param.grad = grad
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())
    assert ours.detach().dist(solution) <= start.dist(solution)


@pytest.mark.parametrize("case", CASES)
def test_param_groups_weight_decay(case):
    """Mirrors test_param_groups_weight_decay: the input's options (weight decay
    included) on the weight, weight_decay=0 on the bias, and the loss still moves
    the right way."""
    weight, bias, x = _linear_problem()
    bias_kwargs = {**deepcopy(case.kwargs), "weight_decay": 0.0}
    optimizer = case.entry.info.optim_cls(
        [
            {"params": [weight], **deepcopy(case.kwargs)},
            {"params": [bias], **bias_kwargs},
        ]
    )
    initial = _squared_loss(weight, bias, x).item()
    for _ in range(20):
        loss = _closure(optimizer, weight, bias, x)()
        optimizer.step()
    if case.maximize:
        assert loss.item() > initial
    else:
        assert loss.item() < initial


@pytest.mark.parametrize("case", CASES)
def test_param_groups_lr(case):
    """Mirrors test_param_groups_lr: a group's own lr overrides the optimizer's
    (lr=1e-28); parameters in the 1e-28 group do not move."""
    kwargs = deepcopy(case.kwargs)
    if "lr" not in kwargs or kwargs["lr"] == 0:
        kwargs["lr"] = 1e-3
    weight, bias, x = _linear_problem()
    irrelevant = Parameter(torch.randn(2))
    irrelevant_before = irrelevant.detach().clone()
    optimizer = case.entry.info.optim_cls(
        [{"params": [weight, bias], **kwargs}, {"params": [irrelevant]}], lr=1e-28
    )
    initial = _squared_loss(weight, bias, x).item()
    for _ in range(20):
        loss = _closure(optimizer, weight, bias, x)()
        irrelevant.grad = torch.rand_like(irrelevant)
        optimizer.step()
    if case.maximize:
        assert loss.item() > initial
    else:
        assert loss.item() < initial
    assert torch.equal(irrelevant.detach(), irrelevant_before)


# -- steps that must not move anything ------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_step_is_noop_when_params_have_no_grad(case):
    """Mirrors test_step_is_noop_when_params_have_no_grad: parameters without a
    .grad are left alone (and get no state); the closure's loss is returned."""
    params = [torch.randn(2, 3) for _ in range(2)]
    before = [p.clone() for p in params]
    optimizer = case.make(params)
    loss = optimizer.step(lambda: torch.tensor([1.0]))
    assert torch.equal(loss, torch.tensor([1.0]))
    for p, old in zip(params, before, strict=True):
        assert torch.equal(p, old)
    assert not any(optimizer.state.values())


def _weight_decay_moves_params(case):
    if case.kwargs.get("weight_decay", 0) != 0:
        return "weight decay moves parameters even with zero gradients"
    return None


@pytest.mark.parametrize("case", case_params(skip_if=_weight_decay_moves_params))
def test_step_is_noop_for_zero_grads(case):
    """Mirrors test_step_is_noop_for_zero_grads: with no weight decay, a zero
    gradient leaves the parameter exactly where it was."""
    param = Parameter(torch.randn(5, 1))
    before = param.detach().clone()
    # AdamW's default decay (1e-2) would move parameters without any gradient
    # (torch shrinks AdamW's lr here for that reason); we switch the decay off.
    optimizer = case.make([param], weight_decay=0.0)
    param.grad = torch.zeros_like(param)
    optimizer.step(lambda: torch.tensor([1.0]))
    assert torch.equal(param.detach(), before)


# -- parameters of every shape and dtype ------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_zero_size_and_scalar_params(case):
    """Mirrors the zero-size / 0-d parameter that torch's foreach and fused tests
    append (torch issue 100701): such parameters step without error next to normal ones."""
    normal = Parameter(torch.randn(3, 2))
    before = normal.detach().clone()
    empty = Parameter(torch.empty(0))
    empty_2d = Parameter(torch.empty(0, 4))
    scalar = Parameter(torch.tensor(0.5))
    params = [normal, empty, empty_2d, scalar]
    for p in params:
        p.grad = torch.rand_like(p)
    optimizer = case.make(params)
    for _ in range(3):
        optimizer.step()
    assert empty.shape == (0,) and empty_2d.shape == (0, 4)
    assert scalar.shape == () and torch.isfinite(scalar).all()
    assert not torch.equal(normal.detach(), before)
    assert all(optimizer.state[p] for p in params)


#: torch.testing.assert_close's default (rtol, atol) per dtype.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}
MIXED_DTYPES = tuple(DEFAULT_TOLERANCES)


@pytest.mark.parametrize("case", CASES)
def test_mixed_device_dtype(case):
    """Mirrors test_mixed_device_dtype on the one CPU device: float64, float32,
    float16 and bfloat16 parameters in one group step like torch's fused CPU
    implementation (which, like optiscope, computes low precision in float32),
    within 5x torch's per-dtype tolerance; an integer tensor without grad is ignored."""
    torch.manual_seed(0)
    originals = [torch.rand(2, 3, dtype=dtype) for dtype in MIXED_DTYPES]
    grads = [torch.rand_like(p) for p in originals]
    integer_tensor = torch.randint(1024, (2, 3))
    integer_before = integer_tensor.clone()
    params, ref_params = ([Parameter(p.clone()) for p in originals] for _ in range(2))
    for p, q, g in zip(params, ref_params, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    optimizer = case.make([*params, integer_tensor])
    reference = case.make_torch(ref_params, fused=True)
    for _ in range(7):
        optimizer.step()
        reference.step()
    assert torch.equal(integer_tensor, integer_before)
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        rtol, atol = DEFAULT_TOLERANCES[p.dtype]
        tol = {"rtol": 5 * rtol, "atol": 5 * atol}
        assert p.dtype == q.dtype
        torch.testing.assert_close(
            p.detach(), q.detach(), **tol, msg=lambda m, i=i: f"param {i}: {m}"
        )
        _assert_state_matches_torch(case, optimizer, [p], reference, [q], tol)


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_reference(case):
    """Mirrors test_foreach_matches_forloop / _compare_between, with torch's own
    for-loop optimizer as the ground truth: 10 float32 steps of a small model plus
    a 0-d and a zero-size parameter, one step with no gradients (grads None) and a
    layer frozen for two steps; parameters and state agree at every step."""
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    runs = []
    for make in (case.make, lambda ps: case.make_torch(ps, foreach=False)):
        model = _tiny_model()
        scalar = Parameter(torch.tensor(0.5))
        empty = Parameter(torch.empty(0))
        scalar.grad, empty.grad = torch.tensor(0.25), torch.empty(0)
        params = [*model.parameters(), scalar, empty]
        runs.append({"model": model, "params": params, "optimizer": make(params)})
    for step in range(10):
        for run in runs:
            model, optimizer = run["model"], run["optimizer"]
            if step > 0:
                optimizer.zero_grad()
            model[2].requires_grad_(step not in (3, 4))
            if step != 2:
                model(x).sum().backward()
            optimizer.step()
        ours, theirs = runs
        for i, (p, q) in enumerate(zip(ours["params"], theirs["params"], strict=True)):
            torch.testing.assert_close(
                p.detach(), q.detach(), msg=lambda m, i=i, s=step: f"step {s} p{i}: {m}"
            )
        _assert_state_matches_torch(
            case,
            ours["optimizer"],
            ours["params"],
            theirs["optimizer"],
            theirs["params"],
            {},
        )


@pytest.mark.parametrize("case", CASES)
def test_tensor_lr(case):
    """Mirrors test_tensor_lr: lr=torch.tensor(0.01) takes the same steps as lr=0.01."""
    weight, bias, x = _linear_problem()
    weight_c = weight.detach().clone().requires_grad_(True)
    bias_c = bias.detach().clone().requires_grad_(True)
    with_float = case.make([weight, bias], lr=0.01)
    with_tensor = case.make([weight_c, bias_c], lr=torch.tensor(0.01))
    # a float32 tensor holds 0.01 to float32 precision only: close, not bitwise
    for _ in range(5):
        _closure(with_float, weight, bias, x)()
        _closure(with_tensor, weight_c, bias_c, x)()
        with_float.step()
        with_tensor.step()
        torch.testing.assert_close(weight_c.detach(), weight.detach())
        torch.testing.assert_close(bias_c.detach(), bias.detach())


@pytest.mark.parametrize("case", CASES)
def test_non_empty_state(case):
    """Mirrors test_non_empty_state: after one step every stepped parameter has state."""
    model = nn.Linear(5, 5)
    optimizer = case.make(model.parameters())
    model(torch.rand(2, 5)).sum().backward()
    optimizer.step()
    assert len(optimizer.state) == 2
    for state in optimizer.state.values():
        assert len(state) > 0


# -- printing and copying ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_optimizer_can_be_printed(case):
    """Mirrors test_optimizer_can_be_printed: repr works and names every option."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    optimizer = case.make(params)
    text = repr(optimizer)
    assert text.startswith(type(optimizer).__name__)
    for key in optimizer.param_groups[0]:
        if key != "params":
            assert key in text


@pytest.mark.parametrize("case", CASES)
def test_deepcopy_copies_all_public_attrs(case):
    """Mirrors test_deepcopy_copies_all_public_attrs."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    optimizer = case.make(params)
    for _ in range(3):
        optimizer.step()

    def public_attrs(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public_attrs(deepcopy(optimizer)) == public_attrs(optimizer)


# -- state_dict ---------------------------------------------------------------------------


NAMING = [
    pytest.param(False, False, id="plain-to-plain"),
    pytest.param(True, False, id="named-to-plain"),
    pytest.param(False, True, id="plain-to-named"),
    pytest.param(True, True, id="named-to-named"),
]


@pytest.mark.parametrize(("named_source", "named_copy"), NAMING)
@pytest.mark.parametrize("case", CASES)
def test_state_dict_deterministic(case, named_source, named_copy):
    """Mirrors test_state_dict_deterministic: a copy loaded from the state_dict has
    the same state_dict (every param_groups key included), steps identically, and
    stays identical; repeated param groups have identical representations."""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    optimizer = case.make(_named([weight, bias], named_source))
    closure = _closure(optimizer, weight, bias, x)
    for _ in range(10):
        closure()
        optimizer.step()

    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    restored = case.make(_named([weight_c, bias_c], named_copy))
    closure_c = _closure(restored, weight_c, bias_c, x)
    restored.load_state_dict(deepcopy(optimizer.state_dict()))
    # param_names are optional and need not agree (torch drops them here too)
    assert_identical(
        _without_param_names(restored.state_dict()),
        _without_param_names(optimizer.state_dict()),
    )

    for _ in range(10):
        closure()
        closure_c()
        optimizer.step()
        restored.step()
        assert torch.equal(weight_c, weight)
        assert torch.equal(bias_c, bias)
    assert_identical(
        _without_param_names(restored.state_dict()),
        _without_param_names(optimizer.state_dict()),
    )

    restored.param_groups.extend(restored.param_groups)
    assert_identical(
        _without_param_names(restored.state_dict())["param_groups"][-1],
        _without_param_names(optimizer.state_dict())["param_groups"][-1],
    )


def _conv_bn_steps(optimizer, model, x, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("case", CASES)
def test_can_load_older_state_dict(case):
    """Mirrors test_can_load_older_state_dict: a state_dict whose param groups lack
    the newer keys (torch's list, plus optiscope's own options that torch's optimizer
    does not save) loads, gets those keys back, and steps."""
    model = _conv_bn_model()
    x = torch.rand(1, 4, 16, 16)
    optimizer = case.make(model.parameters())
    _conv_bn_steps(optimizer, model, x, 3)
    full_keys = [set(group) for group in optimizer.state_dict()["param_groups"]]
    old_state_dict = deepcopy(optimizer.state_dict())
    for group in old_state_dict["param_groups"]:
        for key in case.entry.info.not_og_supported_flags:
            group.pop(key, None)
    optimizer.load_state_dict(old_state_dict)
    loaded_keys = [set(group) for group in optimizer.state_dict()["param_groups"]]
    for full, loaded in zip(full_keys, loaded_keys, strict=True):
        assert full <= loaded, f"not restored on load: {sorted(full - loaded)}"
    _conv_bn_steps(optimizer, model, x, 1)


@pytest.mark.parametrize(("named_source", "named_copy"), NAMING)
@pytest.mark.parametrize("case", CASES)
def test_can_load_from_to_named_state_dict(case, named_source, named_copy):
    """Mirrors test_can_load_from_to_named_state_dict: state_dicts move between
    optimizers built from parameters() and named_parameters(), and the names are kept."""
    model = _conv_bn_model()
    x = torch.rand(1, 4, 16, 16)

    def params(named):
        return model.named_parameters() if named else model.parameters()

    optimizer = case.make(params(named_source))
    _conv_bn_steps(optimizer, model, x, 3)
    state_dict = deepcopy(optimizer.state_dict())
    loaded = case.make(params(named_copy))
    loaded.load_state_dict(state_dict)
    _conv_bn_steps(loaded, model, x, 1)
    if named_source or named_copy:
        assert loaded.state_dict()["param_groups"][0]["param_names"] == [
            "0.weight",
            "0.bias",
            "1.weight",
            "1.bias",
        ]


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize("case", CASES)
def test_save_load_equality_with_weights_only(case, named):
    """Mirrors test_save_load_equality_with_weights_only: torch.save then torch.load
    (plain and weights_only=True) gives back an identical state_dict."""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    optimizer = case.make(_named([weight, bias], named))
    for _ in range(3):
        optimizer.step(_closure(optimizer, weight, bias, x))
    state_dict = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        assert_identical(torch.load(buffer, weights_only=weights_only), state_dict)


@pytest.mark.parametrize("case", CASES)
def test_load_nontensor_step(case):
    """Mirrors test_load_nontensor_step: a state_dict whose "step" entries are
    Python numbers (older checkpoints) loads and steps, like the tensor one."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    twins = [Parameter(p.detach().clone()) for p in params]
    for p, twin in zip(params, twins, strict=True):
        p.grad = torch.rand_like(p)
        twin.grad = p.grad.clone()
    optimizer, twin_optimizer = case.make(params), case.make(twins)
    for _ in range(3):
        optimizer.step()
        twin_optimizer.step()
    state_dict = deepcopy(optimizer.state_dict())
    for param_state in state_dict["state"].values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].item()
    optimizer.load_state_dict(state_dict)
    optimizer.step()
    twin_optimizer.step()
    for p, twin in zip(params, twins, strict=True):
        assert torch.equal(p, twin)


# -- hooks --------------------------------------------------------------------------------


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@pytest.mark.parametrize("case", CASES)
def test_state_dict_pre_hook(case):
    """Mirrors test_state_dict_pre_hook."""
    optimizer = case.make([torch.rand(2, 3, requires_grad=True)])
    optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert optimizer.state_dict()["state"]["test"] == 1


@pytest.mark.parametrize("case", CASES)
def test_state_dict_post_hook(case):
    """Mirrors test_state_dict_post_hook."""
    optimizer = case.make([torch.rand(2, 3, requires_grad=True)])
    optimizer.register_state_dict_post_hook(_state_dict_post_hook)
    assert optimizer.state_dict()["ran_state_dict_pre_hook"] is False


@pytest.mark.parametrize("case", CASES)
def test_state_dict_pre_post_hook(case):
    """Mirrors test_state_dict_pre_post_hook."""
    optimizer = case.make([torch.rand(2, 3, requires_grad=True)])
    optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
    optimizer.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = optimizer.state_dict()
    assert "test" not in state_dict["state"]
    assert state_dict["ran_state_dict_pre_hook"] is True


def _set_lr_in_place(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _replace_with_lr_copy(optimizer, state_dict):
    replacement = deepcopy(state_dict)
    replacement["param_groups"][0]["lr"] = 0.003
    return replacement


def _record_load_post_hook(optimizer):
    optimizer.state["saw_lr_from_replacement"] = (
        optimizer.param_groups[0]["lr"] == 0.003
    )
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_pre_hook_and_prepend(case):
    """Mirrors test_load_state_dict_pre_hook_and_prepend: pre hooks may edit or
    replace the state_dict, and prepend=True runs a hook first."""
    optimizer = case.make([torch.rand(2, 3, requires_grad=True)])
    state_dict = optimizer.state_dict()
    optimizer.register_load_state_dict_pre_hook(_set_lr_in_place)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002
    optimizer.register_load_state_dict_pre_hook(_replace_with_lr_copy, prepend=True)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_post_hook(case):
    """Mirrors test_load_state_dict_post_hook."""
    optimizer = case.make([torch.rand(2, 3, requires_grad=True)])
    optimizer.register_load_state_dict_post_hook(_record_load_post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state["saw_lr_from_replacement"] is False
    assert optimizer.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_pre_post_hook(case):
    """Mirrors test_load_state_dict_pre_post_hook: the post hook sees what the pre
    hook's replacement state_dict loaded."""
    optimizer = case.make([torch.rand(2, 3, requires_grad=True)])
    optimizer.register_load_state_dict_pre_hook(_replace_with_lr_copy)
    optimizer.register_load_state_dict_post_hook(_record_load_post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state["saw_lr_from_replacement"] is True
    assert optimizer.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("case", CASES)
def test_step_pre_hook(case):
    """Mirrors test_step_pre_hook: the hook runs before every step until removed."""
    calls = []
    optimizer = case.make([torch.tensor([1.0, 1.0])])
    handle = optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.step()
    optimizer.step()
    assert calls == ["pre", "pre"]
    handle.remove()
    optimizer.step()
    assert calls == ["pre", "pre"]


@pytest.mark.parametrize("case", CASES)
def test_step_post_hook(case):
    """Mirrors test_step_post_hook: the hook runs after every step until removed."""
    calls = []
    optimizer = case.make([torch.tensor([1.0, 1.0])])
    handle = optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    optimizer.step()
    optimizer.step()
    assert calls == ["post", "post"]
    handle.remove()
    optimizer.step()
    assert calls == ["post", "post"]


@pytest.mark.parametrize("case", CASES)
def test_step_all_hooks(case):
    """Mirrors test_step_all_hooks: global pre, local pre, local post, global post,
    in that order, for optiscope and torch optimizers alike; none after removal."""
    calls = []
    params = [torch.tensor([1.0, 1.0])]
    optimizer = case.make(params)
    torch_sgd = torch.optim.SGD(params)
    handles = [
        register_optimizer_step_pre_hook(lambda *args: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda *args: calls.append("global post")),
    ]
    try:
        for opt in (optimizer, torch_sgd):
            handles.append(
                opt.register_step_pre_hook(lambda *args: calls.append("pre"))
            )
            handles.append(
                opt.register_step_post_hook(lambda *args: calls.append("post"))
            )
        one_step = ["global pre", "pre", "post", "global post"]
        optimizer.step()
        assert calls == one_step
        torch_sgd.step()
        assert calls == one_step * 2
        optimizer.step()
        assert calls == one_step * 3
    finally:
        for handle in handles:
            handle.remove()
    optimizer.step()
    torch_sgd.step()
    assert calls == one_step * 3
