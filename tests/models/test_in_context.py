"""Tests of InContextEnergy: masks against a plain transformer per prefix, invariances, Langevin."""

import math

import pytest
import torch
from torch import nn

from pyro_am.models import InContextEnergy


def _model(mode, device, **kwargs):
    torch.manual_seed(0)
    options = {"width": 16, "depth": 2, "heads": 2, "mode": mode, **kwargs}
    return InContextEnergy(dim=2, **options).to(dtype=torch.float64, device=device).eval()


def _reference_energy(model, context, query, causal):
    """Energy of one query (D,) given a context (p, D) by a plain transformer on [x_1 .. x_p, q].

    The sequence runs through the model's own weights with one explicit boolean mask. Context
    token i attends to context tokens j <= i (causal) or to all of them (set), never to the query.
    The query attends to every context token and itself. No two-stream code of the model is used.
    """
    count = context.shape[0]
    tokens = torch.cat([model.embed(context), (model.embed(query) + model.query_embedding)[None]])
    allowed = torch.zeros(count + 1, count + 1, dtype=torch.bool, device=context.device)
    if causal:
        allowed[:count, :count] = torch.ones(count, count, device=context.device).tril().bool()
    else:
        allowed[:count, :count] = True
    allowed[count, :] = True
    h = tokens
    for block in model.blocks:
        q, k, v = block.qkv(block.attention_norm(h)).chunk(3, dim=-1)
        heads, head_dim = block.heads, block.head_dim
        q, k, v = (t.reshape(count + 1, heads, head_dim).transpose(0, 1) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        weights = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
        attended = (weights @ v).transpose(0, 1).reshape(count + 1, -1)
        h = h + block.out(attended)
        h = h + block.mlp(block.mlp_norm(h))
    energy = model.head(model.final_norm(h[-1])).squeeze(-1)
    if model.confinement_std is not None:
        energy = energy + 0.5 * query.square().sum() / model.confinement_std**2
    return energy


@pytest.mark.parametrize("confinement_std", [None, 3.0])
def test_causal_batch_matches_prefix_loop(device, confinement_std):
    model = _model("causal", device, confinement_std=confinement_std)
    context = torch.randn(2, 5, 2, dtype=torch.float64, device=device)
    queries = torch.randn(2, 3, 2, dtype=torch.float64, device=device)

    with torch.no_grad():
        batched = model(context, queries)
        assert batched.shape == (2, 6, 3)
        for b in range(2):
            for p in range(6):
                for m in range(3):
                    expected = _reference_energy(model, context[b, :p], queries[b, m], True)
                    # float64 with different summation orders: agreement to ~1e-12 relative.
                    torch.testing.assert_close(batched[b, p, m], expected, atol=1e-10, rtol=1e-10)


def test_set_batch_matches_reference(device):
    model = _model("set", device)
    context = torch.randn(2, 4, 2, dtype=torch.float64, device=device)
    queries = torch.randn(2, 3, 2, dtype=torch.float64, device=device)

    with torch.no_grad():
        batched = model(context, queries)
        assert batched.shape == (2, 3)
        for b in range(2):
            for m in range(3):
                expected = _reference_energy(model, context[b], queries[b, m], False)
                # float64, summation order only: ~1e-12 relative.
                torch.testing.assert_close(batched[b, m], expected, atol=1e-10, rtol=1e-10)


def test_chosen_prefix_lengths_match_full_pass(device):
    model = _model("causal", device)
    context = torch.randn(3, 6, 2, dtype=torch.float64, device=device)
    queries = torch.randn(3, 4, 2, dtype=torch.float64, device=device)
    lengths = torch.tensor([6, 0, 2], device=device)

    with torch.no_grad():
        every = model(context, queries)
        chosen = model.query_energy(
            model.encode_context(context), queries[:, None].expand(-1, 3, -1, -1), lengths
        )
        full = model.full_context_energy(model.encode_context(context), queries)

    # The same arithmetic per query; float64 rounding only.
    torch.testing.assert_close(chosen, every[:, lengths], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(full, every[:, -1], atol=1e-12, rtol=1e-12)


def test_set_mode_permutation_invariant(device):
    model = _model("set", device)
    context = torch.randn(2, 7, 2, dtype=torch.float64, device=device)
    queries = torch.randn(2, 5, 2, dtype=torch.float64, device=device)
    permutation = torch.randperm(7, device=device)

    with torch.no_grad():
        original = model(context, queries)
        permuted = model(context[:, permutation], queries)
        causal = _model("causal", device)
        causal_original = causal(context, queries)[:, -1]
        causal_permuted = causal(context[:, permutation], queries)[:, -1]

    # float64; a permutation only reorders sums inside attention.
    torch.testing.assert_close(permuted, original, atol=1e-12, rtol=1e-12)
    # The causal mode is order dependent, so the check above can fail.
    assert not torch.allclose(causal_permuted, causal_original, atol=1e-6)


def test_causal_prefix_ignores_later_points(device):
    model = _model("causal", device)
    context = torch.randn(1, 6, 2, dtype=torch.float64, device=device)
    queries = torch.randn(1, 4, 2, dtype=torch.float64, device=device)
    with torch.no_grad():
        before = model(context, queries)
        for m in range(6):
            changed = context.clone()
            changed[:, m] += 3.0
            after = model(changed, queries)
            # E(. | x_<p) for p <= m must not move; float64 rounding only.
            torch.testing.assert_close(after[:, : m + 1], before[:, : m + 1], atol=1e-12, rtol=0)
            # Every longer prefix attends to x_m, so its energies move.
            assert (after[:, m + 1 :] - before[:, m + 1 :]).abs().min() > 1e-9


def test_empty_context_gives_query_only_energy(device):
    model = _model("causal", device)
    queries = torch.randn(2, 3, 2, dtype=torch.float64, device=device)
    context = torch.empty(2, 0, 2, dtype=torch.float64, device=device)
    with torch.no_grad():
        energies = model(context, queries)
        expected = torch.stack(
            [
                torch.stack([_reference_energy(model, context[b], q, True) for q in queries[b]])
                for b in range(2)
            ]
        )
    assert energies.shape == (2, 1, 3)
    # float64 rounding only.
    torch.testing.assert_close(energies[:, 0], expected, atol=1e-10, rtol=1e-10)


def test_langevin_step_matches_per_prefix_gradient(device):
    model = _model("causal", device)
    context = torch.randn(2, 4, 2, dtype=torch.float64, device=device)
    x0 = 2.0 * torch.randn(2, 5, 3, 2, dtype=torch.float64, device=device)

    moved = model.langevin(context, x0, steps=1, step_size=0.5, temperature=0.0, grad_clamp=0.05)

    for b in range(2):
        for p in range(5):
            point = x0[b, p].clone().requires_grad_(True)
            energy = model(context[b : b + 1, :p], point[None]) if p else None
            if p == 0:
                cache = model.encode_context(context[b : b + 1, :0])
                energy = model.query_energy(cache, point[None, None], torch.tensor([0]))
            else:
                energy = energy[:, -1]
            (grad,) = torch.autograd.grad(energy.sum(), point)
            expected = x0[b, p] - 0.5 * grad.clamp(-0.05, 0.05)
            # float64; the batched and the per-prefix graphs differ only in rounding.
            torch.testing.assert_close(moved[b, p], expected, atol=1e-10, rtol=1e-10)
    assert not any(parameter.grad is not None for parameter in model.parameters())


def test_langevin_samples_quadratic_energy(device):
    # With the network's head zeroed, E(x | D) = |x|^2 / (2 c^2), and unadjusted Langevin with step
    # eta at temperature T is a Gaussian AR(1) chain with stationary variance
    # T c^2 / (1 - eta / (2 c^2)) per coordinate, in closed form.
    model = _model("set", device, confinement_std=1.5, width=4, depth=1)
    with torch.no_grad():
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    context = torch.randn(1, 3, 2, dtype=torch.float64, device=device)
    x0 = torch.zeros(1, 3000, 2, dtype=torch.float64, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    eta, temperature, c = 0.5, 0.5, 1.5

    samples = model.langevin(
        context,
        x0,
        steps=30,
        step_size=eta,
        temperature=temperature,
        grad_clamp=None,
        generator=generator,
    )

    expected = temperature * c**2 / (1.0 - eta / (2.0 * c**2))
    # After 30 steps the start's weight in the variance is (1 - eta / c^2)^60 < 1e-6. The sample
    # variance of 6000 Gaussian coordinates has relative standard error sqrt(2 / 6000) = 1.8%;
    # allow 5 standard errors.
    assert samples.var().item() == pytest.approx(expected, rel=0.09)
    assert samples.mean().abs().item() < 5 * math.sqrt(expected / 6000)


def test_langevin_trajectory_and_zero_steps(device):
    model = _model("causal", device)
    context = torch.randn(1, 3, 2, dtype=torch.float64, device=device)
    x0 = torch.randn(1, 2, 2, dtype=torch.float64, device=device)
    same = model.langevin(context, x0, steps=0)
    final, trajectory = model.langevin(context, x0, steps=3, return_trajectory=True)
    assert torch.equal(same, x0)
    assert trajectory.shape == (4, 1, 2, 2)
    assert torch.equal(trajectory[0], x0)
    assert torch.equal(trajectory[-1], final)


def test_dtype_follows_model(device):
    model = InContextEnergy(dim=3, width=8, depth=1, heads=2).to(device)
    context = torch.randn(2, 4, 3, device=device)
    energies = model(context, torch.randn(2, 5, 3, device=device))
    assert energies.dtype == torch.float32
    assert energies.device.type == torch.device(device).type


def test_config_rebuilds_model():
    model = InContextEnergy(dim=2, width=8, depth=1, heads=2, mode="set", confinement_std=4.0)
    rebuilt = InContextEnergy(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    context, queries = torch.randn(1, 3, 2), torch.randn(1, 2, 2)
    assert torch.equal(rebuilt(context, queries), model(context, queries))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 10, "heads": 4}, "divisible by heads"),
        ({"mode": "bidirectional"}, "mode must be one of"),
        ({"depth": 0}, "depth must be an integer"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"confinement_std": -1.0}, "confinement_std must be finite"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InContextEnergy(**{"width": 8, "depth": 1, "heads": 2, **kwargs})


def test_inputs_are_validated():
    model = InContextEnergy(dim=2, width=8, depth=1, heads=2)
    context = torch.randn(1, 3, 2)
    with pytest.raises(ValueError, match=r"context must have shape \(B, n, D\) with D=2"):
        model(torch.randn(1, 3, 3), torch.randn(1, 2, 2))
    with pytest.raises(TypeError, match="queries must be a torch.Tensor"):
        model(context, [[0.0, 0.0]])
    with pytest.raises(ValueError, match="dtype torch.float64"):
        model(context, torch.randn(1, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(context, torch.tensor([[[math.nan, 0.0]]]))
    with pytest.raises(ValueError, match=r"prefix_lengths must lie in \[0, 3\]"):
        model.query_energy(
            model.encode_context(context), torch.randn(1, 1, 2, 2), torch.tensor([4])
        )
    with pytest.raises(ValueError, match="needs mode='causal'"):
        InContextEnergy(dim=2, width=8, depth=1, heads=2, mode="set").langevin(
            context, torch.randn(1, 2, 2, 2)
        )
    with pytest.raises(ValueError, match="step_size must be finite"):
        model.langevin(context, torch.randn(1, 2, 2), step_size=0.0)
