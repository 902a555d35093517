"""LoRA adapters: start at the base, adapt fused layers per slice, merge exactly, freeze the rest."""

import pytest
import torch

from worldloom.adapters import lora
from worldloom.config import ModelConfig
from worldloom.errors import ConfigError
from worldloom.model import LWM


def tiny(backbone="transformer", **kw):
    torch.manual_seed(0)
    return LWM(ModelConfig(backbone=backbone, n_layer=2, n_head=2, n_kv_head=1 if backbone == "transformer" else 0,
                           d_model=32, context=16, vocab_size=40, **kw)).eval()


def randomize(model):
    """Give every B a value (fresh adapters add zero)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".B." in n:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("backbone", ["transformer", "mamba", "retnet"])
def test_fresh_adapter_is_the_base_and_merge_is_exact(backbone):
    m = tiny(backbone)
    x = torch.randint(0, 40, (2, 12))
    before = m(x).logits
    picked = lora.apply_lora(m, rank=4, alpha=8)
    assert picked and all(n != "head" for n in picked)
    assert torch.equal(m(x).logits, before)  # B = 0: the adapted model starts where its base was
    randomize(m)
    adapted = m(x).logits
    assert (adapted - before).abs().max() > 1e-3
    lora.merge(m)
    assert torch.allclose(m(x).logits, adapted, atol=1e-5)
    lora.unmerge(m)
    assert torch.allclose(m(x).logits, adapted, atol=1e-5)
    with lora.disabled(m):
        assert torch.allclose(m(x).logits, before, atol=1e-5)


def test_only_adapters_train_and_fused_qkv_adapts_per_slice():
    m = tiny()
    total = sum(p.numel() for p in m.parameters())
    lora.apply_lora(m, rank=4, alpha=8, targets="qkv,gate_up")
    train = {n for n, p in m.named_parameters() if p.requires_grad}
    assert train and all(".adapters." in n for n in train)
    qkv = m.backbone.blocks[0].attn.qkv
    assert qkv.slices == (32, 16, 16)  # 2 query heads, 1 key/value head of 16
    assert [tuple(b.shape) for b in qkv.adapters["default"].B] == [(32, 4), (16, 4), (16, 4)]
    assert lora.trainable_count(m) < total // 5
    # a B of the key slice changes only the key rows of the merged weight
    with torch.no_grad():
        qkv.adapters["default"].B[1].fill_(0.5)
    delta = lora.merged_state(m)["backbone.blocks.0.attn.qkv.weight"] - qkv.base.weight
    assert delta[:32].abs().max() == 0 and delta[48:].abs().max() == 0 and delta[32:48].abs().max() > 0


def test_merged_state_loads_into_a_plain_model():
    m = tiny()
    lora.apply_lora(m, rank=2, alpha=4, targets="mlp.*")
    randomize(m)
    x = torch.randint(0, 40, (1, 10))
    plain = tiny()
    plain.load_state_dict(lora.merged_state(m))
    assert torch.allclose(plain(x).logits, m(x).logits, atol=1e-5)


def test_two_adapters_on_one_base_switch_and_add():
    m = tiny()
    x = torch.randint(0, 40, (1, 8))
    lora.apply_lora(m, rank=2, alpha=4, name="a")
    lora.apply_lora(m, rank=2, alpha=4, name="b")
    randomize(m)
    lora.set_active(m, ["a"])
    ya = m(x).logits
    lora.set_active(m, ["b"])
    yb = m(x).logits
    lora.set_active(m, [])
    y0 = m(x).logits
    lora.set_active(m, ["a", "b"])
    yab = m(x).logits
    assert not torch.allclose(ya, yb)
    assert not torch.allclose(yab, ya) and not torch.allclose(yab, yb)
    plain = tiny()  # both active: the base plus both updates, as one merged weight
    plain.load_state_dict(lora.merged_state(m))
    assert torch.allclose(plain(x).logits, yab, atol=1e-5)
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        lora.set_active(m, ["c"])


def test_bad_targets_and_rank_are_one_line_errors():
    m = tiny()
    with pytest.raises(ConfigError, match="matches no linear layer.*qkv"):
        lora.apply_lora(m, rank=2, alpha=4, targets="q_proj")
    with pytest.raises(ConfigError, match="rank"):
        lora.apply_lora(m, rank=0, alpha=4)


def test_base_state_is_the_base_merged_or_not():
    m = tiny()
    plain = {k: v.clone() for k, v in m.state_dict().items()}
    lora.apply_lora(m, rank=2, alpha=4)
    randomize(m)
    for merged in (False, True):
        if merged:
            lora.merge(m)
        base = lora.base_state(m)
        assert set(base) == set(plain)
        assert max((base[k] - plain[k]).abs().max().item() for k in plain) < 1e-6
    assert (lora.merged_state(m)["backbone.blocks.0.attn.qkv.weight"] - plain["backbone.blocks.0.attn.qkv.weight"]).abs().max() > 1e-3
