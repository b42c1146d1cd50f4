"""An exported subnet computes what the supernet computes with that subnet active."""

import pytest
import torch

from lit_eff.flops import count_flops
from lit_eff.models import GPT
from lit_eff.supernet import ElasticGPT, ElasticViT, PlainViT, SubnetConfig, SubnetFlops, export_subnet

SPACE = {"embed_dim": [32, 48, 64], "depth": [2, 3, 4], "num_heads": [2, 3, 4], "mlp_ratio": [1.0, 1.5, 2.0]}


def _models():
    torch.manual_seed(0)
    vit = ElasticViT(SPACE, img_size=8, patch_size=2, in_chans=1, num_classes=10)
    gpt = ElasticGPT(SPACE, vocab_size=256, block_size=16)
    with torch.no_grad():  # non-trivial norms and biases so that a wrong slice shows
        for m in (vit, gpt):
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return {"vit": (vit, torch.randn(4, 1, 8, 8)), "gpt": (gpt, torch.randint(0, 256, (4, 16)))}


@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_export_equals_active_subnet(arch):
    model, x = _models()[arch]
    model.eval()
    gen = torch.Generator().manual_seed(3)
    subnets = [model.space.min(), model.space.max(), model.space.sample(gen),
               SubnetConfig(48, 3, (4, 2, 3), (2.0, 1.0, 1.5))]
    flops = SubnetFlops(model)
    for cfg in subnets:
        model.set_subnet(cfg)
        small = export_subnet(model, cfg)
        assert isinstance(small, GPT if arch == "gpt" else PlainViT)
        assert len(small.blocks) == cfg.depth
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) or cfg == model.space.max()
        with torch.no_grad():
            diff = (model(x) - small(x)).abs().max().item()
        assert diff <= 1e-5, (cfg, diff)
        # the cached per-part FLOPs equal one count of the whole subnet and of the exported model
        whole = count_flops(lambda: model(x[:1]), backward=False).forward
        assert flops(cfg) == whole == count_flops(lambda: small(x[:1]), backward=False).forward


def test_export_outside_space():
    model, _ = _models()["gpt"]
    with pytest.raises(ValueError, match=r"Expected a subnet inside the search space.*depth=5 not in \[2, 3, 4\]"):
        export_subnet(model, SubnetConfig(64, 5, (4,) * 5, (2.0,) * 5))
    with pytest.raises(ValueError, match=r"num_heads=\[8, 2\] not all in \[2, 3, 4\]"):
        model.set_subnet(SubnetConfig(64, 2, (8, 2), (2.0, 2.0)))
