"""The walk-through's variant: bit-compatible with its checkpoints, and honest about its size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_same_outputs, num_parameters, randomize_batchnorm
from torch import nn
from walkthrough_reference import WalkthroughMobileNetV2

from mobilenetv2 import (
    SeedMobileNetV2,
    WeightsError,
    create_model,
    load_model,
    load_weights,
    save_weights,
)

WIDTH, CLASSES = 64, 10


@pytest.fixture
def reference(generator: torch.Generator) -> WalkthroughMobileNetV2:
    """The walk-through's model with random weights and non-trivial BatchNorm, in eval mode."""
    model = WalkthroughMobileNetV2(input_width=WIDTH, num_classes=CLASSES)
    with torch.no_grad():  # logits spread enough that the softmax is far from uniform
        model.final[2].weight.mul_(20)
    return randomize_batchnorm(model, generator).eval()


@pytest.fixture
def reference_file(reference: WalkthroughMobileNetV2, tmp_path: Path) -> Path:
    path = tmp_path / "walkthrough.pth"
    torch.save(reference.state_dict(), path)
    return path


def reference_outputs(reference: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The walk-through's probabilities, and its logits (the input of its softmax)."""
    logits = []
    hook = reference.final[3].register_forward_hook(lambda m, args, out: logits.append(args[0]))
    with torch.no_grad():
        probs = reference(x)
    hook.remove()
    return probs, logits[0]


SEED_LOADERS = {
    "load_weights": lambda path: load_weights(
        create_model("seed", input_width=WIDTH, num_classes=CLASSES), path
    ),
    "create_model": lambda path: create_model(
        "seed", input_width=WIDTH, num_classes=CLASSES, weights=path
    ),
    "load_model": lambda path: load_model(path),
}


def test_state_dict_keys_are_the_walkthroughs() -> None:
    ours = create_model("seed", input_width=WIDTH, num_classes=CLASSES).state_dict()
    theirs = WalkthroughMobileNetV2(input_width=WIDTH, num_classes=CLASSES).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("loader", list(SEED_LOADERS))
def test_walkthrough_checkpoint_gives_identical_logits_and_probabilities(
    loader: str, reference: nn.Module, reference_file: Path, generator: torch.Generator
) -> None:
    ours = SEED_LOADERS[loader](reference_file).eval()
    assert isinstance(ours, SeedMobileNetV2)
    x = torch.randn(2, 3, WIDTH, WIDTH, generator=generator)
    probs, logits = reference_outputs(reference, x)
    with torch.no_grad():
        our_logits = ours(x)
    assert_same_outputs(logits, our_logits)
    torch.testing.assert_close(our_logits.softmax(dim=1), probs, atol=1e-5, rtol=0)
    assert probs.max() > 0.5  # not a near-uniform softmax that would agree with anything


def test_return_probs_gives_the_walkthroughs_probabilities(
    reference: nn.Module, reference_file: Path, generator: torch.Generator
) -> None:
    ours = create_model(
        "seed", input_width=WIDTH, num_classes=CLASSES, return_probs=True, weights=reference_file
    ).eval()
    x = torch.randn(2, 3, WIDTH, WIDTH, generator=generator)
    probs, _ = reference_outputs(reference, x)
    with torch.no_grad():
        our_probs = ours(x)
    torch.testing.assert_close(our_probs, probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_probs.sum(dim=1), torch.ones(2))


def test_load_model_reads_input_width_and_classes_off_the_checkpoint(reference_file: Path) -> None:
    model = load_model(reference_file)
    assert model.config["input_width"] == WIDTH
    assert model.config["num_classes"] == CLASSES
    assert model.config["in_channels"] == 3


def test_seed_has_65_million_parameters_at_224() -> None:
    with torch.device("meta"):  # count without allocating 260 MB
        ours = create_model("seed")
        theirs = WalkthroughMobileNetV2()
    assert num_parameters(ours) == 65_021_240
    assert num_parameters(theirs) == 65_021_240
    assert ours.final[2].in_features == 1280 * 7 * 7


@pytest.mark.parametrize("input_width", [100, 16, 0, 225])
def test_input_width_must_be_a_multiple_of_32(input_width: int) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("seed", input_width=input_width)


@pytest.mark.parametrize("size", [(96, 96), (64, 96), (32, 32)])
def test_wrong_input_size_names_the_expected_size(size: tuple[int, int]) -> None:
    model = create_model("seed", input_width=WIDTH, num_classes=CLASSES).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=f"{WIDTH}x{WIDTH}"):
        model(torch.randn(1, 3, *size))


def test_seed_weights_are_refused_by_the_faithful_model(reference_file: Path) -> None:
    with pytest.raises(WeightsError, match="seed"):
        load_weights(create_model("mobilenet_v2_100"), reference_file)


def test_faithful_weights_are_refused_by_the_seed_variant(tmp_path: Path) -> None:
    torch.save(create_model("mobilenet_v2_035").state_dict(), tmp_path / "faithful.pth")
    with pytest.raises(WeightsError, match="mobilenet_v2_100"):
        create_model("seed", input_width=WIDTH, weights=tmp_path / "faithful.pth")


def test_checkpoint_for_another_input_width_names_it(reference_file: Path) -> None:
    with pytest.raises(WeightsError, match=f"input_width={WIDTH}"):
        create_model("seed", input_width=2 * WIDTH, num_classes=CLASSES, weights=reference_file)


def test_seed_round_trips_through_safetensors(
    reference_file: Path, tmp_path: Path, generator: torch.Generator
) -> None:
    model = create_model(
        "seed", input_width=WIDTH, num_classes=CLASSES, return_probs=True, weights=reference_file
    ).eval()
    model.meta["class_names"] = [str(i) for i in range(CLASSES)]
    save_weights(model, tmp_path / "seed.safetensors")
    loaded = load_model(tmp_path / "seed.safetensors").eval()
    assert loaded.config == model.config
    assert loaded.meta == model.meta
    x = torch.randn(1, 3, WIDTH, WIDTH, generator=generator)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_reset_classifier_puts_the_new_layer_where_the_model_is() -> None:
    model = create_model("seed", input_width=WIDTH, num_classes=CLASSES).double().eval()
    model.reset_classifier(3)
    assert model.final[2].weight.dtype == torch.float64
    with torch.no_grad():
        out = model(torch.randn(2, 3, WIDTH, WIDTH, dtype=torch.float64))
    assert out.shape == (2, 3)
    assert model.config["num_classes"] == 3
