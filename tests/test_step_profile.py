"""moec.runtime.step_profile: the per-stream busy shares and per-operation times of a decode step,
from a GPU-shaped trace (two streams) and from a real CPU profile of the tiny artifact."""

from __future__ import annotations

import json

import pytest

from moec.runtime.step_profile import STEP_MARK, format_table, profile_decode, summarize, work_events


def _x(name, cat, ts, dur, stream=None, tid=1):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid,
            "args": {} if stream is None else {"stream": stream}}


def test_device_work_per_stream_from_a_gpu_trace():
    trace = {"traceEvents": [
        _x(f"{STEP_MARK}_0", "user_annotation", 0, 40),
        _x("aten::mm", "cpu_op", 1, 5),  # host side: ignored when the device has work
        _x("gemm_a", "kernel", 0, 10, stream=7),
        _x("gemm_b", "kernel", 5, 10, stream=7),  # overlaps gemm_a: stream 7 busy 0..15
        _x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 0, 30, stream=20),  # the copy stream
        _x("gemm_a", "kernel", 20, 10, stream=7),
    ]}
    events, marks = work_events(trace)
    assert marks == [(0, 40)] and {e["lane"] for e in events} == {"stream 7", "stream 20"}
    s = summarize(events, steps=1, wall_s=40e-6)
    assert s["lanes"] == {"stream 20": pytest.approx(30 / 40), "stream 7": pytest.approx(25 / 40)}
    assert s["busy_fraction"] == pytest.approx(30 / 40)  # the union over both streams: 0..30
    assert s["compute_busy_fraction"] == pytest.approx(25 / 40) and s["copy_busy_fraction"] == pytest.approx(30 / 40)
    top = s["ops"][0]
    assert top["name"] == "Memcpy HtoD (Pinned -> Device)" and top["us_per_step"] == 30
    gemm_a = next(o for o in s["ops"] if o["name"] == "gemm_a")
    assert gemm_a["calls_per_step"] == 2 and gemm_a["us_per_step"] == 20 and gemm_a["kind"] == "kernel"


def test_cpu_operators_count_once_when_nested():
    trace = {"traceEvents": [_x("outer", "cpu_op", 0, 10), _x("inner", "cpu_op", 2, 3), _x("next", "cpu_op", 12, 4)]}
    events, _ = work_events(trace)
    assert [e["name"] for e in events] == ["outer", "next"]
    assert summarize(events, steps=2, wall_s=20e-6)["busy_fraction"] == pytest.approx(14 / 20)


def test_profile_of_the_tiny_artifact(tiny_artifact, tmp_path):
    from moec.runtime import Engine

    engine = Engine.load(tiny_artifact)
    free = engine.allocator.num_free
    result = profile_decode(engine, batch=3, context=20, steps=2, out_dir=tmp_path)
    assert result.step_ms > 0 and 0 < result.busy_fraction <= 1
    names = [op["name"] for op in result.ops]
    assert "moec::moe_experts" in names and "moec::write_kv" in names  # the CPU experts op and the cache write
    write_kv = next(op for op in result.ops if op["name"] == "moec::write_kv")
    assert write_kv["calls_per_step"] == 2  # once per layer
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert engine.allocator.num_free == free  # the profiled sequences gave their blocks back
    assert "ms/step" in format_table(result)


def test_prefill_profile_of_the_tiny_artifact(tiny_artifact, tmp_path):
    from moec.runtime import Engine
    from moec.runtime.step_profile import profile_prefill

    engine = Engine.load(tiny_artifact)
    free = engine.allocator.num_free
    result = profile_prefill(engine, 40, out_dir=tmp_path)
    assert result.kind == "prefill" and result.context == 40 and result.steps == 1
    write_kv = next(op for op in result.ops if op["name"] == "moec::write_kv")
    assert write_kv["calls_per_step"] == 2  # one step through both layers
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert engine.allocator.num_free == free
    assert format_table(result).startswith("prefill, 40 tokens in 1 step(s)")
