"""Router properties: top-k choice, renormalised and scaled weights, selection bias, group limit,
capacity dropping, and the balance loss / z-loss against hand computations."""
import math
from dataclasses import replace

import pytest
import torch

from moe.router import Router, balance_loss, group_limited_mask


def make_router(cfg, **kw):
    r = Router(replace(cfg, **kw))
    r.train()
    return r


def test_topk_picks_highest_scores_and_renormalises(tiny_cfg):
    r = make_router(tiny_cfg, score_func="softmax", top_k=3, norm_topk_prob=True, routed_scaling_factor=2.5)
    x = torch.randn(50, tiny_cfg.hidden_size)
    out = r(x)
    scores = torch.softmax(x @ r.weight.T, -1)
    expected_idx = scores.topk(3, -1).indices
    assert torch.equal(out.expert_idx_TK.sort(-1).values, expected_idx.sort(-1).values)
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.full((50,), 2.5))
    picked = scores.gather(1, out.expert_idx_TK)
    torch.testing.assert_close(out.weights_TK, 2.5 * picked / picked.sum(-1, keepdim=True))


def test_unnormalised_sigmoid_weights_are_raw_scores(tiny_cfg):
    r = make_router(tiny_cfg, score_func="sigmoid", norm_topk_prob=False)
    x = torch.randn(20, tiny_cfg.hidden_size)
    out = r(x)
    torch.testing.assert_close(out.weights_TK, torch.sigmoid(x @ r.weight.T).gather(1, out.expert_idx_TK))


def test_bias_changes_selection_but_not_weights(tiny_cfg):
    r = make_router(tiny_cfg, score_func="sigmoid", expert_bias=True, norm_topk_prob=False)
    x = torch.randn(40, tiny_cfg.hidden_size)
    before = r(x)
    r.expert_bias[3] = 10.0  # expert 3 now always selected
    after = r(x)
    assert (after.expert_idx_TK == 3).any(-1).all()
    assert not torch.equal(before.expert_idx_TK, after.expert_idx_TK)
    scores = torch.sigmoid(x @ r.weight.T)
    # weights are the unbiased scores of the chosen experts
    torch.testing.assert_close(after.weights_TK, scores.gather(1, after.expert_idx_TK))
    assert after.weights_TK.max() <= 1.0


def test_bias_update_moves_toward_balance(tiny_cfg):
    r = make_router(tiny_cfg, expert_bias=True, bias_update_speed=0.01)
    r.load_since_update.copy_(torch.tensor([10., 0, 0, 0, 0, 0, 0, 6]))
    r.update_bias()
    assert r.expert_bias[0] == pytest.approx(-0.01) and r.expert_bias[7] == pytest.approx(-0.01)
    assert r.expert_bias[1] == pytest.approx(0.01)
    assert r.load_since_update.sum() == 0


def test_group_limit_respected(tiny_cfg):
    r = make_router(tiny_cfg, score_func="sigmoid", n_group=4, topk_group=2, top_k=3)
    x = torch.randn(200, tiny_cfg.hidden_size)
    out = r(x)
    groups = out.expert_idx_TK // 2  # 8 experts in 4 groups of 2
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    # the chosen groups are the ones with the best sum of their two best scores
    scores = torch.sigmoid(x @ r.weight.T)
    group_score = scores.view(200, 4, 2).sum(-1)
    best_groups = group_score.topk(2, -1).indices
    for t in range(200):
        assert set(groups[t].tolist()) <= set(best_groups[t].tolist())


def test_group_limited_mask_by_hand():
    s = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.1, 0.2]])  # groups of 2: sums 0.9, 1.0, 0.3
    mask = group_limited_mask(s, n_group=3, topk_group=1)
    assert mask.tolist() == [[False, False, True, True, False, False]]


def test_capacity_drops_overflow_in_token_order(tiny_cfg):
    r = make_router(tiny_cfg, top_k=1, num_experts=8, capacity_factor=1.0)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[5, 0] = 1.0  # every token with x[0] > 0 prefers expert 5
    x = torch.zeros(16, tiny_cfg.hidden_size)
    x[:, 0] = 1.0
    out = r(x)
    capacity = math.ceil(1.0 * 16 * 1 / 8)
    assert (out.expert_idx_TK[:capacity, 0] == 5).all()
    assert (out.expert_idx_TK[capacity:, 0] == -1).all()
    assert out.tokens_per_expert_E[5] == capacity


def test_balance_loss_hand_computed():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]])
    idx = torch.tensor([[0], [1], [0], [2]])  # counts 2, 1, 1 over T*K = 4
    f = [3 * 2 / 4, 3 * 1 / 4, 3 * 1 / 4]
    p = [(0.7 + 0.1 + 0.5 + 0.3) / 4, (0.2 + 0.6 + 0.25 + 0.3) / 4, (0.1 + 0.3 + 0.25 + 0.4) / 4]
    expected = sum(fi * pi for fi, pi in zip(f, p))
    assert balance_loss(scores, idx, 3).item() == pytest.approx(expected, rel=1e-6)


def test_balance_loss_uniform_is_one():
    scores = torch.full((8, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    assert balance_loss(scores, idx, 4).item() == pytest.approx(1.0)


def test_sequence_scope_averages_per_sequence(tiny_cfg):
    r = make_router(tiny_cfg, aux_loss_scope="sequence", aux_loss_coeff=1.0)
    x = torch.randn(2 * 10, tiny_cfg.hidden_size)
    out = r(x, seq_len=10)
    scores = torch.softmax(x @ r.weight.T, -1)
    per_seq = [balance_loss(scores[i * 10:(i + 1) * 10], out.expert_idx_TK[i * 10:(i + 1) * 10], 8)
               for i in range(2)]
    assert out.aux_loss.item() == pytest.approx(sum(per_seq).item() / 2, rel=1e-5)
    whole = balance_loss(scores, out.expert_idx_TK, 8)
    assert out.aux_loss.item() != pytest.approx(whole.item(), rel=1e-6)


def test_group_scope_uses_reduced_counts(tiny_cfg):
    r = make_router(tiny_cfg, aux_loss_scope="group", aux_loss_coeff=1.0)
    x = torch.randn(30, tiny_cfg.hidden_size)
    other_rank = torch.tensor([0., 0, 0, 0, 0, 0, 0, 60])  # another rank sent everything to expert 7
    r.stats_reducer = lambda c: c + other_rank
    out = r(x)
    scores = torch.softmax(x @ r.weight.T, -1)
    local = torch.bincount(out.expert_idx_TK.flatten(), minlength=8).float()
    total = local + other_rank
    expected = balance_loss(scores, out.expert_idx_TK, 8, counts_E=total * local.sum() / total.sum())
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_z_loss_hand_computed(tiny_cfg):
    r = make_router(tiny_cfg, z_loss_coeff=0.5, aux_loss_coeff=0.0)
    x = torch.randn(6, tiny_cfg.hidden_size)
    logits = x @ r.weight.T
    expected = 0.5 * (torch.logsumexp(logits, -1) ** 2).mean()
    assert r(x).z_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_router_runs_in_fp32_under_bf16_input(tiny_cfg):
    r = make_router(tiny_cfg)
    out = r(torch.randn(5, tiny_cfg.hidden_size, dtype=torch.bfloat16))
    assert out.weights_TK.dtype == torch.float32


def test_balance_loss_counts_the_selection_not_the_drops(tiny_cfg):
    # Every token picks expert 5; capacity keeps 2 of 16. The balance loss must see 16 picks of
    # expert 5 (what routing chose), not 2 of expert 5 plus 14 dropped ones charged to anyone.
    r = make_router(tiny_cfg, top_k=1, num_experts=8, capacity_factor=1.0, aux_loss_coeff=1.0)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[5, 0] = 1.0
    x = torch.zeros(16, tiny_cfg.hidden_size)
    x[:, 0] = 1.0
    out = r(x)
    assert (out.expert_idx_TK == -1).sum() == 14
    scores = torch.softmax(x @ r.weight.T, -1)
    expected = balance_loss(scores, torch.full((16, 1), 5), 8)
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
