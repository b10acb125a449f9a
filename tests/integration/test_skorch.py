"""skorch nets with an optiscope optimizer: fit, GridSearchCV, and a pickled net
that goes on training."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from configs import config
from torch import nn

skorch = pytest.importorskip("skorch")
model_selection = pytest.importorskip("sklearn.model_selection")

pytestmark = pytest.mark.integration

#: float32 parity with torch.optim after 5 epochs of 4 batches.
TOLERANCE = 1e-6


class Net(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )

    def forward(self, x):
        return self.layers(x)


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = x @ rng.standard_normal((6, 1)) + 0.1 * rng.standard_normal((64, 1))
    return x, y.astype(np.float32)


def _net(optimizer, lr: float, **kwargs):
    return skorch.NeuralNetRegressor(
        Net,
        optimizer=optimizer,
        lr=lr,
        max_epochs=5,
        batch_size=16,
        train_split=None,
        iterator_train__shuffle=False,
        verbose=0,
        **kwargs,
    )


def _pair(name: str):
    """(optimizer class, lr, kwargs) for optiscope and for torch."""
    cfg = config(name)
    options = dict(cfg.options)
    torch_cls, torch_options = cfg.torch_equivalent
    torch_options = dict(torch_options)
    lr, torch_lr = options.pop("lr"), torch_options.pop("lr")

    def prefixed(d):
        return {f"optimizer__{k}": v for k, v in d.items()}

    return (cfg.cls, lr, prefixed(options)), (
        torch_cls,
        torch_lr,
        prefixed(torch_options),
    )


def _fit(optimizer, lr, kwargs):
    torch.manual_seed(0)  # the module's initial weights
    return _net(optimizer, lr, **kwargs).fit(*_data())


def _parity(a, b, record_property) -> dict:
    pairs = list(zip(a.module_.parameters(), b.module_.parameters(), strict=True))
    diff = max((p - q).abs().max().item() for p, q in pairs)
    scale = max(q.abs().max().item() for _, q in pairs)
    out = {"max_abs": diff, "max_rel": diff / scale}
    for key, value in out.items():
        record_property(key, value)
    return out


@pytest.mark.parametrize("name", ["adam", "adamw", "momentum"])
def test_skorch_fit_matches_torch_optim(name, record_property) -> None:
    ours, ref = _pair(name)
    parity = _parity(_fit(*ours), _fit(*ref), record_property)
    assert parity["max_abs"] <= TOLERANCE, parity


def test_grid_search_picks_what_torch_adam_picks(record_property) -> None:
    """GridSearchCV clones the net for each fold and setting."""

    def search(optimizer):
        torch.manual_seed(0)
        grid = model_selection.GridSearchCV(
            _net(optimizer, 1e-2),
            {"lr": [1e-3, 1e-2], "module__hidden": [4, 16]},
            cv=2,
            scoring="neg_mean_squared_error",
        )
        return grid.fit(*_data())

    ours, ref = search(_pair("adam")[0][0]), search(torch.optim.Adam)
    assert ours.best_params_ == ref.best_params_
    scores = ours.cv_results_["mean_test_score"]
    ref_scores = ref.cv_results_["mean_test_score"]
    diff = float(np.abs(scores - ref_scores).max())
    record_property("max_abs_score", diff)
    assert diff <= TOLERANCE * float(np.abs(ref_scores).max()), (scores, ref_scores)


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_a_pickled_net_goes_on_training_like_the_original(name) -> None:
    ours, _ = _pair(name)
    net = _fit(*ours)
    copy = pickle.loads(pickle.dumps(net))
    net.partial_fit(*_data())
    copy.partial_fit(*_data())
    for p, q in zip(net.module_.parameters(), copy.module_.parameters(), strict=True):
        assert torch.equal(p, q)
