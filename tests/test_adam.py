import math

import pytest
import torch
from torch import nn

from gist_backend.methods.adam import (
    ADAM_STATE_FILENAME,
    adam_precondition,
    load_adam_state,
    normalize_param_name,
    save_adam_state,
)

torch.set_num_threads(1)
B1, B2 = 0.8, 0.95


def _train(named: bool = False, groups: bool = False):
    """Tiny model, 3 AdamW steps; returns model, optimizer, and hand-computed flat (m, v) in named_parameters order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    params = list(model.named_parameters())
    if named:
        opt = torch.optim.AdamW(model.named_parameters(), lr=0.05, betas=(B1, B2), weight_decay=0.1)
    elif groups:  # HF Trainer layout: decay params first, then no-decay (biases)
        decay = [p for n, p in params if n.endswith("weight")]
        nodecay = [p for n, p in params if n.endswith("bias")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                                lr=0.05, betas=(B1, B2))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(B1, B2), weight_decay=0.1)
    m = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    v = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    for step in range(3):
        x = torch.randn(8, 4)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        for n, p in params:  # hand recursion of Adam's moments
            g = p.grad.double()
            m[n] = B1 * m[n] + (1 - B1) * g
            v[n] = B2 * v[n] + (1 - B2) * g * g
        opt.step()
    return model, opt, m, v


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def test_precondition_matches_hand_formula():
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(3, 7, generator=g)
    m = torch.randn(7, generator=g) * 0.1
    v = torch.rand(7, generator=g) * 0.01
    out = adam_precondition(grads, m, v, beta1=B1, beta2=B2, eps=1e-8)
    for i in range(3):
        for j in range(7):
            gij, mj, vj = float(grads[i, j]), float(m[j]), float(v[j])
            want = (B1 * mj + (1 - B1) * gij) / math.sqrt(B2 * vj + (1 - B2) * gij * gij + 1e-8)
            assert abs(float(out[i, j]) - want) <= 1e-5 * max(1.0, abs(want))
    assert torch.equal(grads, torch.randn(3, 7, generator=torch.Generator().manual_seed(1)))  # input untouched
    assert adam_precondition(grads.half(), m, v).dtype == torch.float32
    assert torch.allclose(adam_precondition(grads[0], m, v), adam_precondition(grads, m, v)[0])
    with pytest.raises(ValueError, match="length 7"):
        adam_precondition(grads, m[:5], v)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_roundtrip_after_three_adamw_steps(tmp_path, fmt):
    model, opt, m, v = _train()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    if fmt == "safetensors":
        path = save_adam_state(tmp_path / "state.safetensors", opt, model.named_parameters())
    else:
        path = tmp_path / "optimizer.pt"
        torch.save(opt.state_dict(), path)
    ea, es, b1, b2 = load_adam_state(path, names, shapes)
    assert (b1, b2) == (B1, B2)
    assert ea.dtype == torch.float32 and ea.shape == (sum(p.numel() for p in model.parameters()),)
    torch.testing.assert_close(ea.double(), _flat(m, names), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(es.double(), _flat(v, names), rtol=1e-5, atol=1e-9)
    # Γ(g) from the loaded state equals the formula element-wise
    grads = torch.randn(2, ea.numel())
    out = adam_precondition(grads, ea, es, b1, b2)
    mm, vv = _flat(m, names), _flat(v, names)
    for i in range(2):
        for j in range(ea.numel()):
            gij = float(grads[i, j])
            want = (B1 * float(mm[j]) + (1 - B1) * gij) / math.sqrt(B2 * float(vv[j]) + (1 - B2) * gij * gij + 1e-8)
            assert abs(float(out[i, j]) - want) <= 1e-4 * max(1.0, abs(want))


def test_directory_and_both_formats_agree(tmp_path):
    model, opt, _, _ = _train()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_adam_state(tmp_path / "a" / ADAM_STATE_FILENAME, opt, model.named_parameters())
    torch.save(opt.state_dict(), tmp_path / "b" / "optimizer.pt")
    ra = load_adam_state(tmp_path / "a", names, shapes)
    rb = load_adam_state(tmp_path / "b", names, shapes)
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1]) and ra[2:] == rb[2:]
    assert not list(tmp_path.glob("a/*.tmp"))
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        load_adam_state(tmp_path, names, shapes)


def test_hf_trainer_param_groups_by_position(tmp_path):
    model, opt, m, v = _train(groups=True)
    by_name = dict(model.named_parameters())
    order = [n for n in by_name if n.endswith("weight")] + [n for n in by_name if n.endswith("bias")]
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    ea, es, _, _ = load_adam_state(tmp_path / "optimizer.pt", order, [by_name[n].shape for n in order])
    torch.testing.assert_close(ea.double(), _flat(m, order), rtol=1e-5, atol=1e-7)
    # named_parameters order is not the optimizer's order here: the shape check catches it
    names = list(by_name)
    with pytest.raises(ValueError, match="optimizer's parameter order"):
        load_adam_state(tmp_path / "optimizer.pt", names, [by_name[n].shape for n in names])
    with pytest.raises(ValueError, match="every parameter"):
        load_adam_state(tmp_path / "optimizer.pt", order[:2], [by_name[n].shape for n in order[:2]])


def test_torch_state_with_param_names_matches_by_name(tmp_path):
    model, opt, m, v = _train(named=True)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    by_name = dict(model.named_parameters())
    if "param_names" not in opt.state_dict()["param_groups"][0]:
        pytest.skip("this torch does not store param_names")
    order = ["base_model.model." + n for n in reversed(list(by_name))]  # other order, peft-style names
    ea, _, _, _ = load_adam_state(tmp_path / "optimizer.pt", order, [by_name[n[17:]].shape for n in order])
    torch.testing.assert_close(ea.double(), _flat(m, [n[17:] for n in order]), rtol=1e-5, atol=1e-7)


def test_normalize_param_name():
    plain = "model.layers.0.self_attn.q_proj.lora_A.weight"
    for variant in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "module.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "_orig_mod.model.layers.0.self_attn.q_proj.lora_A.my_task.weight",
        plain,
    ]:
        assert normalize_param_name(variant) == plain
    assert normalize_param_name("base_model.model.emb.lora_embedding_A.default") == "emb.lora_embedding_A"
    assert normalize_param_name("lora_B.default.weight") == "lora_B.weight"
    assert normalize_param_name("model.norm.weight") == "model.norm.weight"


def test_name_variants_and_missing(tmp_path):
    model, opt, m, _ = _train()
    plain = [n for n, _ in model.named_parameters()]
    peft = {n: f"base_model.model.{n.replace('.weight', '.lora_A.default.weight')}" for n in plain}
    params = dict(model.named_parameters())
    path = save_adam_state(tmp_path / "s.safetensors", opt, [(peft[n], params[n]) for n in plain])
    wanted = [n.replace(".weight", ".lora_A.weight") for n in plain]  # no prefix, no adapter name
    ea, _, _, _ = load_adam_state(path, wanted, [params[n].shape for n in plain])
    torch.testing.assert_close(ea.double(), _flat(m, plain), rtol=1e-5, atol=1e-7)
    with pytest.raises(KeyError, match=r"1 of 2 parameters.*nope\.weight"):
        load_adam_state(path, [wanted[0], "nope.weight"], [params[plain[0]].shape, torch.Size([1])])
    with pytest.raises(ValueError, match="shape"):
        load_adam_state(path, wanted[:1], [torch.Size([99])])


def test_save_requires_a_step(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizer.step"):
        save_adam_state(tmp_path / "x.safetensors", opt, model.named_parameters())
    frozen = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="none of the named parameters"):
        save_adam_state(tmp_path / "x.safetensors", opt, frozen.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precondition_on_cuda(tmp_path):
    model, opt, _, _ = _train()
    names = [n for n, _ in model.named_parameters()]
    path = save_adam_state(tmp_path / "s.safetensors", opt, model.named_parameters())
    ea, es, b1, b2 = load_adam_state(path, names, [p.shape for _, p in model.named_parameters()])
    grads = torch.randn(4, ea.numel())
    out = adam_precondition(grads.cuda(), ea, es, b1, b2)  # state on CPU is moved to the grads' device
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), adam_precondition(grads, ea, es, b1, b2), rtol=1e-6, atol=1e-6)
