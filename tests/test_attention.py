"""Softmax attention as a vMF mixture posterior, against torch's normalizations and attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_am.attention import (
    VMFAttention,
    attention_vmf_mixture,
    hyperplane_basis,
    normalize_queries,
)
from pyro_am.distributions import VonMisesFisher

DIM, KEY_DIM, NUM_KEYS, NUM_QUERIES = 6, 4, 7, 5
# All cases run in float64, where softmax and the folded products agree to about 1e-14; the
# identity itself is exact, so 1e-6 leaves a wide margin.
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def _tensors(device, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    options = {"dtype": torch.float64, "generator": generator}
    tensors = {
        "x": torch.randn(NUM_QUERIES, DIM, **options),
        "keys": torch.randn(NUM_KEYS, KEY_DIM, **options),
        "values": torch.randn(NUM_KEYS, 3, **options),
        "query_weight": torch.randn(KEY_DIM, DIM, **options),
        "query_bias": torch.randn(KEY_DIM, **options),
        "gain": 0.5 + torch.rand(DIM, **options),
        "bias": torch.randn(DIM, **options),
    }
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def _reference_weights(norm, t, scalar_gain=None, use_gain=False, use_bias=False):
    """softmax_j(s q.k_j) with q = W_Q y + b_Q and y from torch's own normalization (eps = 0)."""
    x = t["x"]
    if scalar_gain is not None:
        weight = torch.full((DIM,), scalar_gain, dtype=x.dtype, device=x.device)
    else:
        weight = t["gain"] if use_gain else None
    bias = t["bias"] if use_bias else None
    if norm == "layer":
        y = F.layer_norm(x, (DIM,), weight, bias, eps=0.0)
    elif norm == "rms":
        y = F.rms_norm(x, (DIM,), weight, eps=0.0)
        y = y if bias is None else y + bias
    q = y @ t["query_weight"].T + t["query_bias"]
    scale = 1 / math.sqrt(KEY_DIM)
    return torch.softmax(scale * q @ t["keys"].T, dim=-1), scale


CASES = [
    ("layer", {"scalar_gain": 1.7}),
    ("layer", {"use_gain": True}),
    ("layer", {"use_gain": True, "use_bias": True}),
    ("rms", {"scalar_gain": 0.8}),
    ("rms", {"use_gain": True, "use_bias": True}),
]


@pytest.mark.parametrize("norm, options", CASES)
def test_attention_weights_are_vmf_responsibilities(device, norm, options):
    t = _tensors(device)
    expected, scale = _reference_weights(norm, t, **options)
    if "scalar_gain" in options:
        gain = options["scalar_gain"]
    else:
        gain = t["gain"] if options.get("use_gain") else None
    mixture = attention_vmf_mixture(
        t["keys"],
        scale,
        norm=norm,
        gain=gain,
        bias=t["bias"] if options.get("use_bias") else None,
        query_weight=t["query_weight"],
        query_bias=t["query_bias"],
    )
    unit = normalize_queries(t["x"], norm)
    torch.testing.assert_close(mixture.responsibilities(unit), expected, **TOLERANCE)
    # The attention output is the posterior mean of the values.
    torch.testing.assert_close(
        mixture.posterior_mean(unit, t["values"]), expected @ t["values"], **TOLERANCE
    )


def test_unit_queries_without_normalization(device):
    t = _tensors(device)
    keys = torch.randn(NUM_KEYS, DIM, dtype=torch.float64, device=device)
    unit = t["x"] / t["x"].norm(dim=-1, keepdim=True)
    expected = torch.softmax(0.9 * unit @ keys.T, dim=-1)
    mixture = attention_vmf_mixture(keys, 0.9)
    torch.testing.assert_close(mixture.responsibilities(unit), expected, **TOLERANCE)
    torch.testing.assert_close(
        mixture.posterior_mean(unit, t["values"]), expected @ t["values"], **TOLERANCE
    )
    # Mean directions k_j / |k_j|, concentrations s |k_j|, as the identity states.
    torch.testing.assert_close(mixture.concentrations, 0.9 * keys.norm(dim=-1))
    torch.testing.assert_close(mixture.mean_directions, keys / keys.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_responsibilities_match_vmf_posterior(device, norm):
    # The mixture's posterior from VonMisesFisher.log_prob on the sphere the queries lie on:
    # S^{D-2} in Helmert coordinates of the hyperplane for LayerNorm, S^{D-1} for RMSNorm.
    t = _tensors(device, generator_seed=1)
    expected, scale = _reference_weights(norm, t, use_gain=True, use_bias=True)
    mixture = attention_vmf_mixture(
        t["keys"],
        scale,
        norm=norm,
        gain=t["gain"],
        bias=t["bias"],
        query_weight=t["query_weight"],
        query_bias=t["query_bias"],
    )
    unit = normalize_queries(t["x"], norm)
    directions = mixture.mean_directions
    if norm == "layer":
        basis = hyperplane_basis(DIM, torch.float64, device)
        unit, directions = unit @ basis, directions @ basis
    components = VonMisesFisher(directions, mixture.concentrations).log_prob(unit.unsqueeze(-2))
    posterior = torch.softmax(mixture.log_weights + components, dim=-1)
    torch.testing.assert_close(posterior, expected, **TOLERANCE)
    energy_weights = mixture.energy().responsibilities(unit)
    torch.testing.assert_close(energy_weights, expected, **TOLERANCE)


def test_layer_norm_output_lies_on_sphere_in_hyperplane(device):
    x = torch.randn(10, DIM, dtype=torch.float64, device=device)
    y = F.layer_norm(x, (DIM,), torch.full((DIM,), 2.5, dtype=torch.float64, device=device), eps=0)
    norms = y.norm(dim=-1)
    # Radius gamma sqrt(D) and zero coordinate sum, to float64 rounding.
    torch.testing.assert_close(norms, torch.full_like(norms, 2.5 * math.sqrt(DIM)))
    torch.testing.assert_close(y.sum(-1), torch.zeros_like(norms), atol=1e-12, rtol=0)
    torch.testing.assert_close(normalize_queries(x, "layer") * 2.5 * math.sqrt(DIM), y)


def test_hyperplane_basis_is_orthonormal():
    basis = hyperplane_basis(7, torch.float64)
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(basis.sum(0), torch.zeros(6, dtype=torch.float64))


def _reference_attention(module, x, mask=None):
    """torch's scaled dot-product attention on the normalized tokens y = Norm(x), eps = 0."""
    if module.norm == "layer":
        y = F.layer_norm(x, (module.embed_dim,), eps=0.0)
    else:
        y = F.rms_norm(x, (module.embed_dim,), eps=0.0)
    q, k, v = (
        module._split(projection(y)) for projection in (module.query, module.key, module.value)
    )
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return module.output(heads.transpose(-3, -2).flatten(-2))


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("causal", [False, True])
def test_tied_vmf_attention_reproduces_sdpa(device, norm, causal):
    torch.manual_seed(0)
    module = VMFAttention(8, num_heads=2, norm=norm, tied=True, dtype=torch.float64).to(device)
    x = torch.randn(3, 5, 8, dtype=torch.float64, device=device)
    mask = torch.ones(5, 5, dtype=torch.bool, device=device).tril() if causal else None
    torch.testing.assert_close(module(x, mask=mask), _reference_attention(module, x, mask))


def test_decoupled_vmf_attention_is_a_mixture_posterior(device):
    torch.manual_seed(1)
    module = VMFAttention(6, num_heads=1, norm="layer", dtype=torch.float64).to(device)
    x = torch.randn(4, 6, dtype=torch.float64, device=device)
    _, weights = module(x, return_weights=True)
    mixture = module.mixture(x)
    basis = hyperplane_basis(6, torch.float64, device)
    unit = normalize_queries(x, "layer") @ basis
    components = VonMisesFisher(mixture.mean_directions[0] @ basis, mixture.concentrations[0])
    expected = torch.softmax(mixture.log_weights[0] + components.log_prob(unit.unsqueeze(-2)), -1)
    torch.testing.assert_close(weights[0], expected, **TOLERANCE)
    # The concentration and the mixing weight come from their own parameters.
    kappa = F.softplus(module.concentration(math.sqrt(6) * normalize_queries(x, "layer")))
    torch.testing.assert_close(mixture.concentrations[0], kappa[:, 0])


def test_decoupled_vmf_attention_trains_its_own_parameters():
    torch.manual_seed(2)
    module = VMFAttention(6, num_heads=2, norm="rms", dtype=torch.float64)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    module(x).square().sum().backward()
    for parameter in (module.concentration.weight, module.mixing_logits.weight):
        assert parameter.grad is not None
        assert bool(torch.isfinite(parameter.grad).all())
        assert parameter.grad.abs().sum() > 0


def test_invalid_arguments_raise():
    keys = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="norm"):
        attention_vmf_mixture(keys, 1.0, norm="batch")
    with pytest.raises(ValueError, match="unit norm"):
        normalize_queries(torch.full((2, 4), 2.0, dtype=torch.float64), "none")
    with pytest.raises(ValueError, match="no direction"):
        normalize_queries(torch.ones(2, 4, dtype=torch.float64), "layer")
    with pytest.raises(ValueError, match="scale"):
        attention_vmf_mixture(keys, -1.0)
    with pytest.raises(ValueError, match="query_weight"):
        attention_vmf_mixture(keys, 1.0, query_weight=torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_heads"):
        VMFAttention(7, num_heads=2)
