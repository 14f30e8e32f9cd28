"""The live part of /metrics: the decode mode, the load's fallbacks and checks, eager steps."""

from prometheus_client.parser import text_string_to_metric_families

from stream_engine.server.metrics import Live, Metrics


def _samples(metrics: Metrics) -> dict:
    body = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_graph_capture_time_and_eager_steps_are_exposed():
    eager = {"semantic": 0, "coarse": 0}
    mode = {
        "attn": "sdpa",
        "cuda_graphs": "semantic,coarse",
        "sdpa": "masked=EFFICIENT_ATTENTION",
        "fallbacks": ["coarse decode graphs -> eager: capture failed (RuntimeError: x)"],
        "checks": {"capture_s": {"semantic": 1.5, "coarse": 0.25}, "graphs": {}},
    }
    metrics = Metrics(
        Live(
            connections=lambda: 0,
            streams=lambda: 0,
            depths=lambda: {},
            mode=lambda: mode,
            eager_steps=lambda: eager,
        )
    )
    s = _samples(metrics)
    assert s[("stream_engine_graph_capture_seconds", (("stage", "semantic"),))] == 1.5
    assert s[("stream_engine_graph_capture_seconds", (("stage", "coarse"),))] == 0.25
    assert s[("stream_engine_eager_decode_steps_total", (("stage", "coarse"),))] == 0
    eager["coarse"] = 7  # read at every scrape
    s = _samples(metrics)
    assert s[("stream_engine_eager_decode_steps_total", (("stage", "coarse"),))] == 7
    reason = mode["fallbacks"][0]
    assert s[("stream_engine_load_fallbacks", (("reason", reason),))] == 1
    labels = (("attn", "sdpa"), ("cuda_graphs", "semantic,coarse"))
    labels += (("sdpa", "masked=EFFICIENT_ATTENTION"),)
    assert s[("stream_engine_decode_mode", labels)] == 1  # checks and fallbacks not labels
