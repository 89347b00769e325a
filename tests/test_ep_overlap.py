"""benchmarks/ep_overlap.py's logic on CPU (gloo, tiny shape): every measurement of EP=1 and EP=2 is
made, written in the common result format, and drawn. The numbers mean nothing here."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import ep_overlap  # noqa: E402
from result_format import load_result  # noqa: E402


def test_ep_overlap_measures_every_part_on_gloo(tmp_path, capsys):
    assert ep_overlap.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    doc = json.loads((tmp_path / "ep_overlap.json").read_text())
    assert set(doc["runs"]) == {"1", "2"}
    ep2 = doc["runs"]["2"]["workloads"]["prefill"]
    for key in ("a2a_ms", "compute_ms", "step_off_ms", "step_on_2_ms", "step_on_4_ms", "hidden_fraction"):
        assert ep2[key] is not None and ep2[key] >= 0, key
    assert ep2["received_rows"] > 0
    for run in doc["runs"].values():
        for row in run["workloads"].values():
            assert row["load"]["expert_max_over_mean"] >= 1.0 and row["load"]["rank_max_over_mean"] >= 1.0
    names = {m["name"] for m in load_result(tmp_path / "ep_overlap.json")["metrics"]}
    assert {"ep2/a2a_busbw", "ep2/prefill/throughput_over_ep1", "ep2/decode_b8/a2a_hidden_fraction",
            "ep1/prefill/tokens_per_s", "ep2/prefill/rank_load_max_over_mean",
            "ep1/prefill/expert_load_max_over_mean"} <= names
    assert (tmp_path / "ep_overlap.png").stat().st_size > 0
    assert "all-to-all" in table and "prefill" in table


def test_expert_load_is_busiest_over_mean(tmp_path):
    """Known answers: every assignment on expert 0 is 4x the mean over 4 experts and 2x over 2
    ranks of 2 experts each; an even spread is 1.0; two layers are averaged."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        skewed = [(None, torch.zeros(6, 2, dtype=torch.long))]
        even = [(None, torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]))]
        assert ep_overlap.expert_load(skewed, 4, 2) == {"expert_max_over_mean": 4.0, "rank_max_over_mean": 2.0}
        assert ep_overlap.expert_load(even, 4, 2) == {"expert_max_over_mean": 1.0, "rank_max_over_mean": 1.0}
        both = ep_overlap.expert_load(skewed + even, 4, 2)
        assert both == {"expert_max_over_mean": 2.5, "rank_max_over_mean": 1.5}
    finally:
        dist.destroy_process_group()
