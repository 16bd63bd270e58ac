import fractions
import pytest
import torch
from torch import nn

from resnet_deploy import models
from resnet_deploy.nn import BatchNormAddReLU2d


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and running statistics, so eval parity means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, BatchNormAddReLU2d)):
                shape = module.running_mean.shape
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
    return model


@pytest.mark.parametrize("build, blocks", [(models.resnet18, [2, 2, 2, 2]), (models.resnet34, [3, 4, 6, 3])])
@pytest.mark.parametrize("fused", [True, False])
def test_d2l_architecture(build, blocks, fused):
    model = build(fused=fused)
    assert [len(stage) for stage in model.stages] == blocks
    assert model.stem.conv.kernel_size == (7, 7) and model.stem.conv.stride == (2, 2)
    assert model.stem.conv.out_channels == 64 and isinstance(model.stem.pool, nn.MaxPool2d)
    for index, (stage, channels) in enumerate(zip(model.stages, [64, 128, 256, 512])):
        first = stage[0]
        assert first.conv2.out_channels == channels
        # the first block of stages 2-4 halves height and width, with a 1x1 conv shortcut
        assert first.conv1.stride == ((1, 1) if index == 0 else (2, 2))
        assert (first.shortcut is None) == (index == 0)
        if first.shortcut is not None:
            assert first.shortcut.kernel_size == (1, 1) and first.shortcut.stride == (2, 2)
        assert all(block.shortcut is None for block in stage[1:])
    assert model.head[-1].in_features == 512 and model.head[-1].out_features == 10


@pytest.mark.parametrize("fused", [True, False])
def test_every_batch_norm_followed_by_relu_is_fused_or_not(fused):
    model = models.resnet18(fused=fused)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, BatchNormAddReLU2d))]
    assert len(norms) == 1 + 2 * 8  # stem + two per block
    expected = BatchNormAddReLU2d if fused else models.BatchNormReLU2d
    assert all(type(m) is expected for m in norms)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("size", [28, 96])
def test_output_shape(size):
    model = models.resnet18().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert models.resnet18(in_channels=3, num_classes=5).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("build", [models.resnet18, models.resnet34])
def test_fused_and_plain_have_the_same_state_dict(build):
    fused, plain = build(fused=True).state_dict(), build(fused=False).state_dict()
    assert list(fused) == list(plain)
    assert all(fused[key].shape == plain[key].shape for key in fused)
    assert "stem.bn.running_var" in fused and "stages.1.0.bn2.num_batches_tracked" in fused


@pytest.mark.parametrize("source_fused", [True, False])
def test_weights_move_between_fused_and_plain_with_the_same_eval_outputs(source_fused):
    torch.manual_seed(0)
    source = randomize_batch_norms(models.resnet18(fused=source_fused)).eval()
    target = models.resnet18(fused=not source_fused)
    target.load_state_dict(source.state_dict())
    target.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), atol=1e-5, rtol=1e-5)


def test_fused_and_plain_train_the_same():
    """One training step from the same weights: same loss, gradients and running statistics."""
    torch.manual_seed(0)
    fused, plain = randomize_batch_norms(models.resnet18(fused=True)), models.resnet18(fused=False)
    plain.load_state_dict(fused.state_dict())
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8)
    losses = []
    for model in (fused, plain):
        loss = nn.functional.cross_entropy(model.train()(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'resnet50'; expected one of resnet18, resnet34"):
        models.build_model("resnet50")


def test_config_rebuilds_the_model():
    model = models.resnet34(in_channels=3, num_classes=7, fused=False)
    assert model.config == {"arch": "resnet34", "in_channels": 3, "num_classes": 7, "fused": False}
    assert list(models.build_model(**model.config).state_dict()) == list(model.state_dict())


# ------------------------------------------------------------------------------------------ checkpoints
def write_checkpoint(path, model):
    torch.save({"model": model.config, "state_dict": model.state_dict(), "classes": [str(i) for i in range(10)],
                "input": {"size": [28, 28], "mean": 0.5, "std": 0.5}, "epoch": 1}, path)
    return path


@pytest.mark.parametrize("fused", [None, True, False])
def test_build_model_from_checkpoint(tmp_path, fused):
    source = randomize_batch_norms(models.resnet18(fused=True)).eval()
    path = write_checkpoint(tmp_path / "checkpoint.pt", source)
    model = models.build_model_from_checkpoint(path, fused=fused)
    assert not model.training and model.config["fused"] == (True if fused is None else fused)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=1e-5)
    assert models.load_checkpoint(path)["input"]["size"] == [28, 28]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.pt; expected a file written by"):
        models.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt cannot be loaded as a checkpoint"):
        models.load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"model": fractions.Fraction(1, 3)}, tmp_path / "object.pt")  # not loadable with weights_only
    with pytest.raises(ValueError) as refusal:
        models.load_checkpoint(tmp_path / "object.pt")
    assert str(refusal.value).endswith("object.pt cannot be loaded as a checkpoint (not a PyTorch file of tensors and "
                                       "plain containers); expected a file written by `resnet-deploy train`")
    torch.save({"state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt lacks model, classes, input, epoch; expected a checkpoint"):
        models.load_checkpoint(tmp_path / "partial.pt")
