"""Model specs (`noisyops.zoo`): built-in names, torchvision:NAME, timm:NAME, package.module:factory,
and the conversion of timm models (timm's small ``test_*`` networks and MobileNetV3-small-0.5):
clean == the original bit for bit, noise reaches every weight through forward and backward."""
import pytest
import torch
from torch import nn

import noisyops
from noisyops import LayerConfig
from noisyops.zoo import build_network, parse_model_spec

timm = pytest.importorskip("timm")

TIMM_MODELS = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit", "mobilenetv3_small_050"]


def tiny_factory(num_classes: int = 3, width: int = 4) -> nn.Module:
    """The ``package.module:factory`` target of the tests (also used by test_evaluation)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))


class Nested:
    small = staticmethod(lambda: tiny_factory(2, 2))


def test_parse_model_spec_forms_and_errors():
    assert parse_model_spec("lenet5") == ("builtin", "lenet5")
    assert parse_model_spec("ResNet20") == ("builtin", "resnet20")
    assert parse_model_spec("torchvision:resnet18") == ("torchvision", "resnet18")
    assert parse_model_spec("timm:test_vit") == ("timm", "test_vit")
    assert parse_model_spec("tests.test_zoo:tiny_factory") == ("factory", "tests.test_zoo:tiny_factory")
    for bad in ("resnet1000", "", "timm:", "not a module:x", "pkg:1abc"):
        with pytest.raises(ValueError, match="model="):
            parse_model_spec(bad)


def test_build_network_every_kind():
    torch.manual_seed(0)
    assert isinstance(build_network("lenet5"), nn.Module)
    tv = build_network("torchvision:resnet18", kwargs={"num_classes": 7})
    assert tv.fc.out_features == 7 and not tv.training
    tm = build_network("timm:test_resnet", kwargs={"num_classes": 5})
    assert tm(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    f = build_network("tests.test_zoo:tiny_factory", kwargs={"num_classes": 4})
    assert f[-1].out_features == 4
    assert build_network("tests.test_zoo:Nested.small")[-1].out_features == 2
    with pytest.raises(ValueError, match="torchvision has no model"):
        build_network("torchvision:no_such_net")
    with pytest.raises(ValueError, match="timm has no model"):
        build_network("timm:no_such_net")
    with pytest.raises(ValueError, match="cannot import module"):
        build_network("no_such_pkg.mod:f")
    with pytest.raises(ValueError, match="has no attribute"):
        build_network("tests.test_zoo:missing")
    with pytest.raises(ValueError, match="weights="):
        build_network("lenet5", weights="DEFAULT")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        build_network("collections:OrderedDict")


@pytest.mark.filterwarnings("ignore:.*weight std is 0")
@pytest.mark.filterwarnings("ignore:.*is a Linear with its own forward")
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_clean_conversion_is_identical(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    conv = noisyops.convert(model, LayerConfig())
    n = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert len(noisyops.noisy_layers(conv)) == n
    with torch.no_grad():
        assert torch.equal(conv(x), model(x))


@pytest.mark.filterwarnings("ignore:.*weight std is 0")
@pytest.mark.filterwarnings("ignore:.*is a Linear with its own forward")
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_noisy_forward_backward_reaches_every_weight(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    conv = noisyops.convert(model, LayerConfig(eta=0.02, w_range=2.0, w_bits=8), seed=1).train()
    x = torch.randn(2, 3, 64, 64)
    out = conv(x)
    with torch.no_grad():
        assert not torch.equal(out, model.train()(x))
    out.square().mean().backward()
    for _, m in noisyops.noisy_layers(conv):
        w = m._noisy_weight()
        assert w.grad is not None and torch.isfinite(w.grad).all()
