"""`simulate validate --models` (simulator/validate_models.py): the parts that do not train."""
import pytest

from config import ConfigError, from_dict, load_yaml
from simulator.validate_models import DEFAULT_MODELS_CONFIG, ModelCheckConfig, pick, spearman, summarize_models


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one swap among four: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(0.8660254)  # ties get their average rank


def test_pick_takes_both_ends_once():
    assert pick(list(range(10)), 3, 2) == [0, 1, 2, 8, 9]
    assert pick(list(range(4)), 3, 3) == [0, 1, 2, 3]


def test_summary_pass_needs_six_a_high_correlation_and_the_best_close():
    rows = [{"model": f"m{i}", "predicted_tokens_per_s": 100 - i, "measured_tokens_per_s": 50 - i,
             "calibration_only_tokens_per_s": 90 - i} for i in range(6)]
    s = summarize_models(rows)
    assert s["rank_correlation"] == pytest.approx(1.0) and s["best_shortfall_pct"] == 0 and s["pass"]
    rows[0]["measured_tokens_per_s"] = 40  # the predicted best measures 20 % below the best (m1, 49)
    s = summarize_models(rows)
    assert s["measured_best"] == "m1" and s["best_shortfall_pct"] == pytest.approx(100 * (1 - 40 / 49))
    assert not s["pass"]
    assert summarize_models(rows[:5])["pass"] is False  # fewer than six trained


def test_shipped_config_and_bad_ones():
    cfg = from_dict(ModelCheckConfig, load_yaml(DEFAULT_MODELS_CONFIG), "model check")
    assert len(cfg.model_space.candidates(cfg.model)) >= cfg.best + cfg.worst >= 6
    data = load_yaml(DEFAULT_MODELS_CONFIG)
    with pytest.raises(ConfigError, match="case.world: the model check trains one process"):
        from_dict(ModelCheckConfig, {**data, "case": {"name": "x", "world": 2}}, "model check")
    with pytest.raises(ConfigError, match="best/worst"):
        from_dict(ModelCheckConfig, {**data, "best": 0}, "model check")
