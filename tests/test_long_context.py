"""The long-context benchmark's arithmetic: the line fit, its capped extrapolation, and the
28-layer estimate (benchmarks/long_context.py, benchmarks/long_context_28_layers.py)."""
import json
from pathlib import Path

import pytest

from benchmarks.long_context import EXTRAPOLATION_CAP, fit, longest_t, summarize
from benchmarks.long_context_28_layers import GiB, MiB, Model, update_total


def test_fit_recovers_a_line():
    a, b = fit([(256, 1000.0 + 0.5 * 256), (1024, 1000.0 + 0.5 * 1024), (4096, 1000.0 + 0.5 * 4096)])
    assert a == pytest.approx(1000.0) and b == pytest.approx(0.5)


def test_longest_t_interpolates_inside_and_follows_the_last_segment_beyond():
    # flat, then steep: the peak as a max of terms growing at different rates
    points = [(256, 8000.0), (1024, 8001.0), (2048, 9025.0)]
    assert longest_t(points, 8500.0) == pytest.approx(1024 + 499 / 1024 * 1024)
    # beyond: from (2048, 9025) at 1 MiB per token, not the whole-range line's ~0.55
    assert longest_t(points, 10000.0) == pytest.approx(2048 + 975)
    assert longest_t(points, 7000.0) == 0
    assert longest_t([(256, 5.0), (512, 5.0)], 10.0) == float("inf")


def test_summarize_labels_extrapolation_and_caps_each_implementation():
    recs = [dict(impl="flat", t=t, peak_mib=8000 + 0.001 * t, step_s=1.0, loss=0.0) for t in (256, 512, 1024)]
    recs += [dict(impl="steep", t=t, peak_mib=8000 + 3.0 * t, step_s=1.0, loss=0.0) for t in (256, 512, 2048)]
    fits, table = summarize(recs, [16.0, 12.0])
    assert fits["flat"]["max_t"]["16.0"] == f"> {EXTRAPOLATION_CAP * 1024:,} (cap)"
    # steep: (16 * 1024 - 8000) / 3 = 2794.7 past the largest measured 2048 (floored: a length that fits)
    assert fits["steep"]["max_t"]["16.0"] == "2,794 (beyond measured)"
    # 12 GiB: 12288 MiB falls between the measured 512 (9536) and 2048 (14144) points
    assert fits["steep"]["max_t"]["12.0"] == f"{int(512 + (12288 - 9536) / 3):,}"
    assert fits["steep"]["mib_per_token_last"] == pytest.approx(3.0)
    assert "| steep | 256, 512, 2048 |" in table


def test_update_total_adds_the_extra_to_loss_moments_only():
    moments = {"loss forward": 10 * MiB, "loss backward": 20 * MiB, "block backward": 100 * MiB}
    base = update_total(GiB, moments, 0)
    assert base == int(GiB + 100 * MiB * 1.1 + 512 * MiB)
    assert update_total(GiB, moments, 50 * MiB) == base  # 20 + 50 < 100: the block backward still peaks
    assert update_total(GiB, moments, 200 * MiB) == int(GiB + 220 * MiB * 1.1 + 512 * MiB)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    measured = tmp_path_factory.mktemp("lc") / "long_context.json"
    recs = [dict(impl="ours", t=t, peak_mib=8000 + 0.01 * t) for t in (256, 1024, 4096)]
    recs += [dict(impl="naive", t=t, peak_mib=9000 + 1.75 * t) for t in (256, 1024)]  # 4096 never ran
    measured.write_text(json.dumps({"records": recs}))
    config = Path(__file__).resolve().parents[1] / "configs" / "paper_qwen3_1p7b.yaml"
    return Model(config, measured, 24.0, 1)


def test_reference_bracket_is_above_ours_and_grows_with_t(model):
    rows = [model.row(t) for t in (1024, 4096, 16384)]
    for r in rows:
        assert r["ours_update"] < r["naive_low"] < r["naive_high"]
    for key in ("ours_update", "naive_low", "naive_high", "generation"):
        assert [r[key] for r in rows] == sorted(r[key] for r in rows)
    # high bracket: 1.74 MiB per token of a 1-rollout micro-batch, from the measured slopes
    assert model.per_token["naive_high"] == pytest.approx(1.74 * MiB)


@pytest.mark.parametrize("key", ["naive_high", "naive_low", "generation"])
def test_longest_is_the_last_fitting_multiple(model, key):
    t = int(model.longest(key).replace(",", ""))
    assert model.row(t)[key] <= model.budget < model.row(t + 256)[key]
