"""BatchNormAddReLU2d against nn.BatchNorm2d followed by (+ residual and) ReLU."""
import pytest
import torch
from torch import nn

from resnet_deploy.nn import BatchNormAddReLU2d


def _pair(channels=6, momentum=0.1):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
        plain.running_mean.uniform_(-0.2, 0.2)
        plain.running_var.uniform_(0.5, 1.5)
    fused = BatchNormAddReLU2d(channels, momentum=momentum)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def test_state_dict_has_batchnorm_names_and_loads_both_ways():
    plain, fused = _pair()
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    back = nn.BatchNorm2d(6)
    back.load_state_dict(fused.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_training_steps_match_batchnorm_then_relu(momentum, memory_format):
    plain, fused = _pair(momentum=momentum)
    for step in range(3):
        x = torch.randn(4, 6, 5, 5).contiguous(memory_format=memory_format)
        residual = torch.randn(4, 6, 5, 5).contiguous(memory_format=memory_format)
        torch.testing.assert_close(fused(x, residual), torch.relu(plain(x) + residual))
        torch.testing.assert_close(fused(x), torch.relu(plain(x)))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value)


def test_eval_matches_and_keeps_running_stats():
    plain, fused = _pair()
    plain.eval()
    fused.eval()
    x, residual = torch.randn(1, 6, 3, 3), torch.randn(1, 6, 3, 3)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    torch.testing.assert_close(fused(x, residual), torch.relu(plain(x) + residual))
    for key, value in before.items():
        assert torch.equal(fused.state_dict()[key], value)


def test_torchscript_module_matches_eager():
    _, fused = _pair()
    scripted = torch.jit.script(fused)
    x, residual = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4)
    for training in (False, True):
        fused.train(training)
        scripted.train(training)
        torch.testing.assert_close(scripted(x, residual), fused(x, residual))
    torch.testing.assert_close(scripted.running_var, fused.running_var)


def test_is_not_replaced_by_sync_batchnorm_conversion():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BatchNormAddReLU2d(6))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not isinstance(BatchNormAddReLU2d(6), nn.modules.batchnorm._BatchNorm)
    assert isinstance(converted[1], BatchNormAddReLU2d)
