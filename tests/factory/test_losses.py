"""Position weighting of the training losses (`app.factory.losses.Decision`)."""

from __future__ import annotations

import torch

from app.factory.losses import Decision, weighted_mean


def test_uniform_decision_is_the_plain_mean() -> None:
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])]
    assert torch.isclose(weighted_mean(values, Decision()), torch.tensor(2.5))


def test_first_positions_of_every_row_weigh_more() -> None:
    # rows [0, 10, 10] and [0, 10]: the first position of each weighs 3, the rest 1
    values = [torch.tensor([0.0, 10.0, 10.0]), torch.tensor([0.0, 10.0])]
    got = weighted_mean(values, Decision(tokens=1, weight=3.0))
    assert torch.isclose(got, torch.tensor(30.0 / 9.0))  # (10 + 10 + 10) / (3 + 1 + 1 + 3 + 1)


def test_rows_shorter_than_the_decision_span_are_all_decision() -> None:
    assert Decision(tokens=4, weight=5.0).weights(2).tolist() == [5.0, 5.0]
    assert Decision(tokens=2, weight=5.0).weights(3).tolist() == [5.0, 5.0, 1.0]


def test_weighting_moves_the_gradient_to_the_decision_tokens() -> None:
    x = torch.zeros(3, requires_grad=True)
    weighted_mean([x], Decision(tokens=1, weight=8.0)).backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, torch.tensor([0.8, 0.1, 0.1]))
