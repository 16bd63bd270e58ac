"""The op benchmark's pieces that decide what is measured: the ResNet-18 sites, the bound, a real tiny run."""
import numpy as np
import pytest
import torch

from resnet_deploy import op_benchmark


def test_resnet18_sites_follow_the_d2l_layout_at_96x96():
    sites = {(shape, residual): count for shape, residual, count in op_benchmark.resnet18_fused_sites(96, 64)}
    # Stem: 7x7/2 conv then BN+ReLU at 48x48 (max-pooled to 24x24 after it). Each stage has two residual
    # blocks, each with a BN+ReLU after its first conv and a BN+add+ReLU after its second.
    expected = {((64, 64, 48, 48), False): 1}
    for channels, size in ((64, 24), (128, 12), (256, 6), (512, 3)):
        expected[((64, channels, size, size), False)] = 2
        expected[((64, channels, size, size), True)] = 2
    assert sites == expected


def test_a_tiny_run_times_every_implementation_against_a_footprint_bound():
    report = op_benchmark.run([(2, 3, 5, 5)], ["nchw", "channels_last"], with_compile=False, min_run_time=0.01,
                              log=lambda line: None)
    rows = report["results"]
    assert [(r["memory_format"], r["mode"]) for r in rows] == [
        ("nchw", "eval forward"), ("nchw", "train forward+backward"),
        ("channels_last", "eval forward"), ("channels_last", "train forward+backward")]
    activation_bytes = 2 * 3 * 5 * 5 * 4
    for row in rows:
        assert row["fused_ms"] > 0 and row["eager_ms"] > 0 and row["compile_ms"] is None
        # PyTorch's own kernel with the eval bound's traffic is timed for eval only
        assert (row["builtin_ms"] > 0) if row["mode"] == "eval forward" else (row["builtin_ms"] is None)
        passes = op_benchmark.EVAL_PASSES if row["mode"] == "eval forward" else op_benchmark.TRAIN_PASSES
        assert row["bound_ms"] == pytest.approx(passes * activation_bytes / (row["bandwidth_gbs"] * 1e9) * 1e3)
        assert row["eager_vs_bound"] == pytest.approx(row["eager_ms"] / row["bound_ms"])
        assert row["fused_faults"] >= 0 and row["eager_faults"] >= 0
    assert report["env"]["malloc"] in ("retain", "system") or report["env"]["malloc"].startswith("user")


def test_interleaved_medians_time_each_step_separately():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        torch.ones(200_000).sum()

    def fast():
        calls["fast"] += 1

    times = op_benchmark.interleaved_medians_ms({"slow": slow, "fast": fast}, min_run_time=0.05, rounds=2)
    assert times["slow"] > times["fast"] > 0
    assert calls["slow"] > 2 and calls["fast"] > 2


def test_interleaved_rounds_take_turns_and_rotate_who_goes_first():
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in "abc"}
    per_round = op_benchmark.interleaved_rounds_ms(steps, min_run_time=0.03, rounds=3)
    assert all(len(runs) == 3 and all(len(calls) >= 1 for calls in runs) for runs in per_round.values())
    # after one warm-up call each, the rounds run a, b, c, then b, c, a, then c, a, b (each step's calls together)
    turns = [name for i, name in enumerate(order[3:]) if i == 0 or order[3 + i - 1] != name]
    assert turns == list("abcbcacab")
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        op_benchmark.interleaved_rounds_ms(steps, min_run_time=0.03, rounds=0)


def test_eval_steps_run_inside_inference_mode_entered_per_block_and_training_steps_outside():
    modes = {"eval": [], "train": []}
    eval_step = op_benchmark._eval_step(lambda *args: modes["eval"].append(torch.is_inference_mode_enabled()),
                                        [None] * 6)

    def train_step():
        modes["train"].append(torch.is_inference_mode_enabled())

    op_benchmark.interleaved_rounds_ms({"eval": eval_step, "train": train_step}, min_run_time=0.02, rounds=2)
    op_benchmark.faults_per_call(eval_step, calls=3)
    assert modes["eval"] and set(modes["eval"]) == {True}
    assert modes["train"] and set(modes["train"]) == {False}
    assert not torch.is_inference_mode_enabled()


def test_the_stores_comparison_keeps_each_steps_mode(monkeypatch):
    modes = {False: [], True: []}

    def recording_fused(*args):
        training = args[-1]
        modes[training].append(torch.is_inference_mode_enabled())
        return op_benchmark.unfused(*args)

    monkeypatch.setattr(op_benchmark, "fused", recording_fused)
    op_benchmark.compare_stores((2, 3, 4, 4), ["nchw"], min_run_time=0.02, rounds=1, log=lambda line: None)
    assert modes[False] and set(modes[False]) == {True}  # eval
    assert modes[True] and set(modes[True]) == {False}  # training


def test_compare_in_rounds_sets_the_candidate_against_each_baseline():
    per_round = {"fused": [[10.0, 10.2], [20.0]], "unfused": [[11.0, 11.22], [22.0]], "again": [[11.1], [22.2]]}
    row = op_benchmark.compare_in_rounds(per_round, "fused", "unfused", "again")
    assert row["rounds"] == 2
    assert row["candidate_ms"] == pytest.approx(15.05) and row["baseline_ms"] == pytest.approx(16.555)
    assert row["speedup"] == pytest.approx(1.1) and row["speedup_ci"] == pytest.approx([1.1, 1.1])
    assert row["speedup_vs_again"] == pytest.approx((11.1 / 10.1 + 22.2 / 20.0) / 2)
    assert row["a_a_ratio"] == pytest.approx((11.1 / 11.11 + 22.2 / 22.0) / 2)
    assert row["verdict"] == "faster"
    # slower than one baseline, level with the other: no verdict; slower than both: slower
    mixed = op_benchmark.compare_in_rounds(per_round, "again", "fused", "unfused")
    assert mixed["speedup"] < 1 and mixed["verdict"] == "within the noise"
    assert op_benchmark.compare_in_rounds(per_round, "again", "fused", "fused")["verdict"] == "slower"


def test_paired_ratio_is_the_median_of_round_by_round_ratios():
    # Each round's candidate is 1.05x faster than its baseline, while both drift by up to 2x between rounds: every
    # per-round ratio is 1.05, so the drift leaves no spread and the interval closes on 1.05.
    drift = np.linspace(1.0, 2.0, 40)
    baseline = 10.0 * drift
    candidate = baseline / 1.05
    ratio, low, high = op_benchmark.paired_ratio(baseline, candidate)
    assert ratio == pytest.approx(1.05) and low == pytest.approx(1.05) and high == pytest.approx(1.05)
    # Round by round, not overall: the medians of these (30 and 19) are from different rounds; the ratios are
    # 2, 10/9, 2, 20/19 and 40/39.
    assert op_benchmark.paired_ratio([50, 10, 30, 20, 40], [25, 9, 15, 19, 39])[0] == pytest.approx(10 / 9)


def test_paired_ratio_interval_covers_one_for_identical_steps_and_excludes_it_for_a_real_difference():
    rng = np.random.default_rng(1)
    baseline = rng.normal(10.0, 0.3, 40)
    same = rng.normal(10.0, 0.3, 40)  # the same step timed again: noise only
    faster = rng.normal(10.0 / 1.04, 0.3 / 1.04, 40)  # 4% faster, with the same relative noise
    ratio, low, high = op_benchmark.paired_ratio(baseline, same)
    assert low < 1 < high
    # against an independent reference: the order statistics that bracket the median of 40 values
    ratios = np.sort(baseline / same)
    assert ratios[12] <= low <= ratio <= high <= ratios[27]
    ratio, low, high = op_benchmark.paired_ratio(baseline, faster)
    assert 1 < low < 1.04 < high


@pytest.mark.parametrize("intervals, expected", [
    ([(1.03, 1.06), (1.01, 1.04)], "faster"),
    ([(0.94, 0.97), (0.96, 0.99)], "slower"),
    ([(0.99, 1.02), (1.00, 1.03)], "within the noise"),
    # ahead of one unfused model but not of the other, identical one: the difference may be that instance's
    ([(1.01, 1.03), (0.99, 1.01)], "within the noise"),
    ([(0.97, 0.99), (1.01, 1.03)], "within the noise"),
])
def test_a_speedup_counts_only_over_every_identical_baseline(intervals, expected):
    assert op_benchmark.verdict(intervals) == expected


def test_comparisons_refuse_what_they_cannot_compare():
    with pytest.raises(ValueError, match="at least one interval"):
        op_benchmark.verdict([])
    with pytest.raises(ValueError, match="as many numerators as denominators"):
        op_benchmark.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        op_benchmark.paired_ratio([], [])


def test_store_comparison_restores_the_threshold():
    from resnet_deploy import _library

    before = _library.load().streaming_min_bytes()
    rows = op_benchmark.compare_stores((2, 16, 4, 4), ["channels_last"], min_run_time=0.01, rounds=1,
                                       log=lambda line: None)
    assert [r["mode"] for r in rows] == ["eval forward", "train forward+backward"]
    assert all(r["streaming_ms"] > 0 and r["normal_ms"] > 0 for r in rows)
    assert _library.load().streaming_min_bytes() == before


@pytest.mark.parametrize("name,category", [
    ("resnet_deploy::bn_add_relu_eval", "sites"), ("aten::batch_norm", "sites"), ("aten::add_", "sites"),
    ("aten::add", "sites"), ("aten::relu_", "sites"), ("aten::relu", "sites"), ("aten::clamp_min_", "sites"),
    ("aten::conv2d", "convolution"), ("aten::max_pool2d", "max_pool"), ("aten::addmm", "other"),
    ("aten::linear", "other"), ("aten::adaptive_avg_pool2d", "other"), ("aten::_foreach_add_", "other")])
def test_profiled_operators_are_sorted_into_parts_of_a_resnet_forward(name, category):
    assert op_benchmark.op_category(name) == category


def test_forward_breakdown_charges_each_top_level_operator_to_its_part():
    convolution_and_pooling = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.MaxPool2d(2)).eval()
    parts = op_benchmark.forward_breakdown_ms(convolution_and_pooling, torch.randn(2, 1, 16, 16), forwards=2)
    assert parts["sites"] == 0 and parts["other"] == 0
    assert parts["convolution"] > 0 and parts["max_pool"] > 0
    assert parts["total"] == pytest.approx(parts["convolution"] + parts["max_pool"])

    from resnet_deploy.models import resnet18

    for fused in (True, False):
        parts = op_benchmark.forward_breakdown_ms(resnet18(fused=fused).eval(), torch.randn(1, 1, 32, 32), 2)
        assert parts["sites"] > 0 and parts["convolution"] > 0 and parts["max_pool"] > 0


def test_per_call_costs_time_every_step_at_one_shape():
    rows = op_benchmark.per_call_costs((1, 8, 3, 3), min_run_time=0.01, log=lambda line: None)
    assert [(r["mode"], r["step"]) for r in rows] == [
        ("copy", "the bound's call"), ("autograd", "grad of x * 2"), ("eval forward", "fused"),
        ("eval forward", "eager"), ("train forward+backward", "fused"), ("train forward+backward", "eager")]
    assert all(r["shape"] == [1, 8, 3, 3] and r["us"] > 0 for r in rows)


def test_op_table_renders_reports_saved_before_the_builtin_column():
    from resnet_deploy import bench

    saved = {"shape": [2, 3, 5, 5], "memory_format": "nchw", "residual": True, "mode": "eval forward",
             "fused_ms": 1.0, "eager_ms": 2.0, "compile_ms": None, "bound_ms": 0.5, "bandwidth_gbs": 10.0,
             "fused_faults": 0, "eager_faults": 0, "speedup_vs_eager": 2.0, "eager_vs_bound": 4.0}
    assert "| eval forward | 1.000 | 2.000 | - | - | 0.500 | 2.00x | 2.00x | 4.00x |" in bench.op_table(
        {"results": [saved]})


def test_end_to_end_times_fused_unfused_and_a_second_unfused_model_in_the_same_rounds():
    report = op_benchmark.end_to_end(image_size=32, train_batch=2, eval_batches=(1, 2), min_run_time=0.05, rounds=3,
                                     train_rounds=2, log=lambda line: None)
    rows = report["results"]
    assert [(r["mode"], r["batch_size"]) for r in rows] == [("train step", 2), ("eval", 1), ("eval", 2)]
    for row in rows:
        assert row["rounds"] == (2 if row["mode"] == "train step" else 3)
        assert row["fused_ms"] > 0 and row["unfused_ms"] > 0 and row["unfused_again_ms"] > 0
        assert row["speedup_ci"][0] <= row["speedup"] <= row["speedup_ci"][1]
        assert row["speedup_vs_again_ci"][0] <= row["speedup_vs_again"] <= row["speedup_vs_again_ci"][1]
        assert row["a_a_ci"][0] <= row["a_a_ratio"] <= row["a_a_ci"][1]
        assert row["verdict"] == op_benchmark.verdict([row["speedup_ci"], row["speedup_vs_again_ci"]])
    # eval rows say where each model's forward spends its time; the second unfused model is timed only
    assert all(set(r["breakdown_ms"]) == {"fused", "unfused"} for r in rows[1:])
