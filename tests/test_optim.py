"""DecoupledLionW and the cosine-with-warmup schedule against hand-computed values."""

import pytest
import torch

from lynx.optim import DecoupledLionW, build_optimizer, cosine_with_warmup, set_lr


def test_lionw_matches_hand_computed_steps():
    # Step 1 from zero momentum: update = sign((1 - beta1) * g) = sign(g).
    # lr 0.1, initial lr 0.1 -> decay factor wd * 1 = 0.5.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = DecoupledLionW([p], lr=0.1, betas=(0.9, 0.95), weight_decay=0.5)
    p.grad = torch.tensor([0.2, 0.3, -0.4, 0.0])
    opt.step()
    # decay: [0.5, -1, 1.5, 0.25]; minus 0.1 * sign(g) = [0.1, 0.1, -0.1, 0]
    torch.testing.assert_close(p.detach(), torch.tensor([0.4, -1.1, 1.6, 0.25]))
    m = torch.tensor([0.2, 0.3, -0.4, 0.0]) * 0.05  # m = (1 - beta2) * g
    torch.testing.assert_close(opt.state[p]["exp_avg"], m)

    # Step 2 at half the lr: decay factor = wd * lr / initial_lr = 0.25; the update mixes momentum with beta1.
    opt.param_groups[0]["lr"] = 0.05
    g2 = torch.tensor([-0.001, 0.01, 0.005, -1.0])
    p.grad = g2.clone()
    opt.step()
    mix = 0.9 * m + 0.1 * g2  # [0.0089, 0.0145, -0.0175, -0.1]: sign differs from g2 in the first and third
    expected = torch.tensor([0.4, -1.1, 1.6, 0.25]) * 0.75 - 0.05 * torch.sign(mix)
    assert torch.sign(mix)[0] != torch.sign(g2)[0]
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.95 * m + 0.05 * g2)


def test_lionw_zero_weight_decay_is_pure_sign_update_and_skips_missing_grads():
    a = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    b = torch.nn.Parameter(torch.tensor([5.0]))
    opt = DecoupledLionW([a, b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    a.grad = torch.tensor([-3.0, 1e-9])
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([1.01, 0.99]))
    assert b.item() == 5.0 and b not in opt.state


def test_lionw_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="lr"):
        DecoupledLionW(p, lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        DecoupledLionW(p, lr=1e-3, betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(p, "sgd", lr=1e-3, betas=(0.9, 0.9), weight_decay=0.0)


def test_cosine_with_warmup_values():
    f = lambda s: cosine_with_warmup(s, warmup_steps=100, total_steps=1100, alpha_f=0.1)  # noqa: E731
    assert f(0) == 0.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(1.0)
    assert f(600) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(1100) == pytest.approx(0.1)
    assert f(5000) == pytest.approx(0.1)
    # a quarter through the cosine: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 4)) = 0.1 + 0.45 * 1.7071068
    assert f(350) == pytest.approx(0.8681981, abs=1e-7)


@pytest.mark.parametrize("name", ["lionw", "adamw"])
def test_set_lr_follows_the_schedule_from_the_peak(name):
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], name, lr=5e-7, betas=(0.9, 0.95), weight_decay=0.0)
    # Peak 5e-7, warmup 4, cosine over steps 4..10 down to 0.1 of the peak, by hand:
    # step 3: 3/4 of the peak; 5: tau = 1/6, 0.1 + 0.45 * (1 + cos(pi / 6)) = 0.9397114; 7: tau = 1/2, 0.55.
    expected = {0: 0.0, 3: 3.75e-7, 4: 5e-7, 5: 4.698557e-7, 7: 2.75e-7, 10: 5e-8, 12: 5e-8}
    for step, expected_lr in expected.items():
        lr = set_lr(opt, step, warmup_steps=4, total_steps=10, alpha_f=0.1)
        assert lr == opt.param_groups[0]["lr"]
        assert lr == pytest.approx(expected_lr, rel=1e-6, abs=1e-15)
        p.grad = torch.ones(3)
        opt.step()
    assert opt.param_groups[0]["initial_lr"] == 5e-7
