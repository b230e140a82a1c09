import re

import pytest
import torch

from klgrade.errors import CheckpointError, KLGradeError
from klgrade.models import create_model, gradcam_layers, list_models, load_checkpoint, save_checkpoint
from klgrade.models.msanet import FeaturePyramid, SpatialSelfAttention
from timm.layers import SEModule


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_names_and_unknown_name():
    assert {"msa_net", "resnet18", "resnet50", "mobilenet_v2", "densenet121"} <= set(list_models())
    with pytest.raises(KLGradeError, match="unknown model 'vgg99'.*msa_net"):
        create_model("vgg99")
    with pytest.raises(KLGradeError, match="bad option"):
        create_model("msa_net", wings=3)


@pytest.mark.parametrize("options", [{"width": -5}, {"heads": 0}, {"width": "abc"}, {"backbone": "resnet999"},
                                     {"normaliser_detail": True}, {"levels": 0}, {"levels": 9}, {"heads": 3},
                                     {"fpn": "maybe"}, {"drop_rate": 1}])
def test_a_model_option_its_layers_cannot_take_is_a_one_line_error(options):
    """`--option width=-5` or `heads=0` failed with a traceback from inside torch; `levels=0` and `heads=3` (128
    channels do not split into 3 heads) did still, and `width=abc` said "not all arguments converted during string
    formatting"."""
    key, value = next(iter(options.items()))
    with pytest.raises(KLGradeError, match=f"^bad option for model 'msa_net' \\({key}={value!r}\\): ") as raised:
        create_model("msa_net", **options)
    assert "string formatting" not in str(raised.value)


@pytest.mark.parametrize("name, options, problem", [
    ("msa_net", {"width": "abc"}, "width takes a whole number, not 'abc'"),
    ("msa_net", {"attention": 1}, "attention takes true or false, not 1"),
    ("msa_net", {"heads": 3}, "width 128 must be a multiple of heads 3"),
    ("msa_net", {"levels": 9}, "levels 9: backbone resnet18 has fewer feature levels"),
    ("resnet18", {"drop_rate": "abc"}, "drop_rate takes a number, not 'abc'"),
    ("resnet50", {"drop_rate": 2}, "drop_rate is a dropout probability, at least 0 and below 1, not 2")])
def test_a_model_option_of_the_wrong_type_or_range_is_named_before_training(name, options, problem):
    """A baseline built with `drop_rate=abc` or `2` failed only in training's first forward pass, with a traceback."""
    with pytest.raises(KLGradeError, match=re.escape(problem)):
        create_model(name, **options)


def test_without_attention_the_width_need_not_split_into_heads():
    with torch.no_grad():
        assert create_model("msa_net", heads=3, attention=False).eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("name", ["msa_net", "resnet18", "resnet50", "mobilenet_v2", "densenet121"])
def test_every_model_maps_images_to_five_logits_and_trains_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name)
    for size in (224, 192, 256):
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 1, size, size)).shape == (2, 5)
    model.train()
    with torch.no_grad():  # timm zero-initialises the last norm of residual blocks, which stops gradients at step 0
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1.0)
    model(torch.randn(2, 1, 160, 160)).logsumexp(1).sum().backward()
    frozen = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert frozen == []
    assert all(isinstance(layer, torch.nn.Module) for layers in gradcam_layers(model) for layer in layers)


def test_ablations_build_genuinely_smaller_networks():
    full = create_model("msa_net")
    sizes = {flag: _params(create_model("msa_net", **{flag: False})) for flag in ("fpn", "se", "attention")}
    assert all(size < _params(full) for size in sizes.values()), sizes
    kinds = lambda m: {type(x) for x in m.modules()}  # noqa: E731
    assert {FeaturePyramid, SEModule, SpatialSelfAttention} <= kinds(full)
    assert FeaturePyramid not in kinds(create_model("msa_net", fpn=False))
    assert SEModule not in kinds(create_model("msa_net", se=False))
    assert SpatialSelfAttention not in kinds(create_model("msa_net", attention=False))


def test_each_component_is_used_in_the_forward_pass():
    model = create_model("msa_net").eval()
    called = set()
    for module in model.modules():
        if isinstance(module, (FeaturePyramid, SEModule, SpatialSelfAttention)):
            module.register_forward_hook(lambda m, i, o: called.add(type(m)))
    with torch.no_grad():
        model(torch.randn(1, 1, 224, 224))
    assert called == {FeaturePyramid, SEModule, SpatialSelfAttention}
    levels = model.forward_features(torch.randn(1, 1, 224, 224))
    assert [tuple(level.shape[-2:]) for level in levels] == [(28, 28), (14, 14), (7, 7)]


def test_attention_relates_distant_positions():
    block = SpatialSelfAttention(32, heads=4).eval()
    x = torch.randn(1, 32, 6, 6)
    changed = x.clone()
    changed[..., 5, 5] += 5.0
    with torch.no_grad():
        delta = (block(changed) - block(x))[..., 0, 0].abs().sum()
    assert delta > 0, "a far-away token must influence the corner token"


def test_ordinal_head_gives_probabilities_in_the_same_interface():
    for name in ("msa_net", "resnet18", "mobilenet_v2"):
        model = create_model(name, ordinal=True).eval()
        with torch.no_grad():
            probabilities = model(torch.randn(3, 1, 128, 128)).softmax(1)
        assert probabilities.shape == (3, 5)
        torch.testing.assert_close(probabilities.sum(1), torch.ones(3))


def test_save_load_round_trip_is_exact_and_architecture_is_checked(tmp_path):
    torch.manual_seed(1)
    model = create_model("msa_net", width=64, heads=2, fpn=True).eval()
    spec = {"model": {"name": "msa_net", "num_classes": 5, "in_chans": 1, "ordinal": False,
                      "options": {"width": 64, "heads": 2}}, "preprocess": {"size": 128}}
    path = save_checkpoint(tmp_path / "m.safetensors", model, spec)
    loaded, info = load_checkpoint(path)
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info["preprocess"] == {"size": 128}
    with pytest.raises(CheckpointError, match="holds a 'msa_net' model, not 'resnet18'"):
        load_checkpoint(path, expect_model="resnet18")
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, create_model("resnet18"), {"model": {**spec["model"], "options": {}}})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(other)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("ordinal", [False, True])
def test_every_model_computes_exactly_as_saved_after_loading(tmp_path, ordinal):
    """`load_checkpoint` builds the model without initialising it (the file replaces every tensor): nothing may be
    left uninitialised, and the loaded weights must compute bit for bit as the saved ones."""
    x = torch.randn(2, 1, 64, 64)
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name, ordinal=ordinal).eval()
        spec = {"model": {"name": name, "num_classes": 5, "in_chans": 1, "ordinal": ordinal, "options": {}}}
        loaded, _ = load_checkpoint(save_checkpoint(tmp_path / f"{name}.safetensors", model, spec))
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()]), name
        assert all(p.requires_grad for p in loaded.parameters()), name  # fine-tuning from it trains every weight
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x)), name


def test_pretrained_local_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet18")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = create_model("resnet18", pretrained=str(tmp_path / "w.safetensors"))
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_partial_load_of_local_weights_is_reported(tmp_path, caplog):
    from safetensors.torch import save_file

    save_file(create_model("msa_net").state_dict(), str(tmp_path / "w.safetensors"))
    with caplog.at_level("WARNING"):
        create_model("msa_net", pretrained=str(tmp_path / "w.safetensors"))
    assert not caplog.records
    with caplog.at_level("WARNING"):
        create_model("msa_net", fpn=False, pretrained=str(tmp_path / "w.safetensors"))
    assert "the rest start as built" in caplog.text and "w.safetensors" in caplog.text


def test_a_new_normaliser_is_the_identity_and_the_grader_keeps_its_answers():
    torch.manual_seed(0)
    plain = create_model("msa_net", width=32, heads=2).eval()
    with_normaliser = create_model("msa_net", width=32, heads=2, normaliser=True).eval()
    missing, unexpected = with_normaliser.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith("normaliser.") for key in missing)
    for side in (160, 100, 64):  # sides that the normaliser's 4- and 8-pixel grids do not divide evenly too
        x = torch.randn(2, 1, side, side)
        with torch.no_grad():
            assert torch.equal(with_normaliser.normaliser(x), x)
            assert torch.allclose(with_normaliser(x), plain(x), atol=1e-6)


def test_a_normaliser_with_a_detail_gain_starts_as_the_shipped_one_and_learns_to_undo_sharpening():
    """The detail gain (zero at first) leaves a normaliser trained without it as it was when that one's weights are
    loaded; then it learns to undo unsharp masking, which a tone curve alone cannot."""
    from kornia.filters import gaussian_blur2d

    from klgrade.models.normaliser import ProcessingNormaliser

    torch.manual_seed(0)
    trained = ProcessingNormaliser()
    torch.nn.init.normal_(trained.coefficients.weight, std=0.05)
    detailed = ProcessingNormaliser(detail=True)
    missing, unexpected = detailed.load_state_dict(trained.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == ["detail_gain.bias", "detail_gain.weight"]
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(detailed(x), trained(x))
    target = gaussian_blur2d(torch.rand(8, 1, 64, 64), 9, (1.0, 1.0))
    processed = target + 1.0 * (target - gaussian_blur2d(target, 13, (2.0, 2.0)))
    after = {}
    for detail in (False, True):
        torch.manual_seed(0)
        after[detail] = fitted_error(ProcessingNormaliser(detail=detail), processed, target)
    before = (processed - target).abs().mean().item()
    assert after[True] < 0.5 * before and after[True] < 0.6 * after[False], (before, after)


def fitted_error(normaliser, processed: torch.Tensor, target: torch.Tensor, steps: int = 150) -> float:
    """Mean absolute error left after fitting `normaliser` to map `processed` back to `target` (Adam, L1)."""
    optimizer = torch.optim.Adam(normaliser.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = (normaliser(processed) - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (normaliser(processed) - target).abs().mean().item()


def test_the_normaliser_can_learn_a_tone_curve():
    """Fit a gamma-like global change on random images: the output must get much closer than the input was."""
    from klgrade.models.normaliser import ProcessingNormaliser

    torch.manual_seed(0)
    normaliser = ProcessingNormaliser()
    target = torch.rand(8, 1, 64, 64)
    processed = target ** 0.6
    before = (processed - target).abs().mean().item()
    after = fitted_error(normaliser, processed, target)
    assert after < 0.3 * before, (before, after)


def test_the_weights_digest_of_another_file_is_a_checkpoint_error_not_a_read_of_terabytes(tmp_path):
    """A JPEG's first eight bytes, read as a safetensors header's length, asked for ~1e18 bytes: MemoryError."""
    from klgrade.models.weights import weights_digest

    picture = tmp_path / "knee.jpg"
    picture.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100))
    with pytest.raises(CheckpointError, match="not a readable safetensors file .*a header of"):
        weights_digest(picture)
