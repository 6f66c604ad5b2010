"""Figures 3 and 4, PyTorch side: exclusive, time-only and space-only (CUDA streams).

n models (``torch_models``, different weights), one image each, float32 without TF32,
``cudnn.benchmark`` on, inputs on the device:

  exclusive        model 0 on a batch of n images (eagerly; ``exclusive_graph``: replaying
                   a CUDA graph of that batch);
  time_only        the n models in turn on one stream;
  streams          each model on its own CUDA stream, launched eagerly (the paper's
                   space multiplexing inside one process);
  streams_graph    each model's forward captured once as a CUDA graph, the n graphs
                   replayed each on its own stream (no per-kernel launch cost).

A tenant's latency is the GPU time from an event recorded before the step to an event
recorded after its model on its stream; the step's latency is the host's wall-clock time
from the first launch to ``synchronize``. Every contender's outputs are checked against
each model run alone on the default stream before timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.paper._shared import check, torch_cuda_or_reason, torch_environment, torch_fp32_exact
from benchmarks.paper.figure3 import TOLERANCE, _entry, latency_timing


def measure_torch(model_names: list[str], counts: list[int], seed: int, quick: bool, on_partial: Callable[[dict], Any] = lambda _: None) -> dict:
    """Every PyTorch contender for every model and count; ``on_partial`` gets the models so far."""
    reason = torch_cuda_or_reason()
    if reason is not None:
        return {"skipped": reason}
    import torch

    torch_fp32_exact()
    torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {"environment": torch_environment(), "models": {}}
    for name in model_names:
        with torch.inference_mode():
            result["models"][name] = _measure_model(torch, name, counts, seed, quick)
        on_partial(result)
        torch.cuda.empty_cache()
    return result


def _measure_model(torch: Any, name: str, counts: list[int], seed: int, quick: bool) -> dict:
    from benchmarks.paper import torch_models

    size, timing = ("tiny" if quick else "full"), latency_timing(quick)
    n_max = max(counts)
    nets = []
    for i in range(n_max):
        net, image_shape = torch_models.build(name, size, seed + i)
        nets.append(net.cuda())
    x_host = np.random.default_rng(seed).standard_normal((n_max, *image_shape), dtype=np.float32)
    x = torch.from_numpy(x_host).cuda()
    x_rows = [x[i : i + 1] for i in range(n_max)]
    want = torch.cat([nets[i](x_rows[i]) for i in range(n_max)]).cpu().numpy()
    want_0 = torch.cat([nets[0](x_rows[i]) for i in range(n_max)]).cpu().numpy()
    streams = [torch.cuda.Stream() for _ in range(n_max)]
    graphs, graph_outputs = [], []
    for i in range(n_max):
        graph, out = _capture(torch, lambda i=i: nets[i](x_rows[i]))
        graphs.append(graph)
        graph_outputs.append(out)

    rows = []
    for n in counts:
        entry: dict[str, Any] = {"tenants": n}
        xs = x[:n]
        exclusive = lambda: nets[0](xs)  # noqa: E731
        graph, out = _capture(torch, exclusive)
        for method, launch, outputs in (
            ("exclusive", exclusive, None),
            ("exclusive_graph", graph.replay, lambda: out),
        ):
            got = launch() if outputs is None else (launch(), outputs())[1]
            torch.cuda.synchronize()
            err = check(f"{name} {method}", got.cpu().numpy(), want_0[:n], TOLERANCE)
            wall = _median_wall(torch, launch, timing)
            entry[method] = _entry(wall, [wall] * n, err)

        models_in_turn = lambda i: nets[i](x_rows[i])  # noqa: E731
        replay = lambda i: (graphs[i].replay(), graph_outputs[i])[1]  # noqa: E731
        for method, launch_one, on_streams in (
            ("time_only", models_in_turn, False),
            ("streams", models_in_turn, True),
            ("streams_graph", replay, True),
        ):
            _, _, outs = _step(torch, n, launch_one, streams if on_streams else None)
            err = check(f"{name} {method}", torch.cat(outs).cpu().numpy(), want[:n], TOLERANCE)
            samples = [_step(torch, n, launch_one, streams if on_streams else None)[:2] for _ in range(timing["warmup"] + timing["repeats"])]
            samples = samples[timing["warmup"] :]
            wall = statistics.median(s[0] for s in samples)
            per_tenant = [statistics.median(column) for column in zip(*(s[1] for s in samples))]
            entry[method] = _entry(wall, per_tenant, err)
        rows.append(entry)
    return {"size": size, "image": list(image_shape), "rows": rows}


def _capture(torch: Any, forward: Callable[[], Any]) -> tuple[Any, Any]:
    """A CUDA graph of ``forward()`` (warmed up on a side stream first) and its static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    return graph, out


def _median_wall(torch: Any, launch: Callable[[], Any], timing: dict[str, Any]) -> float:
    samples = []
    for repeat in range(timing["warmup"] + timing["repeats"]):
        start = time.perf_counter()
        launch()
        torch.cuda.synchronize()
        if repeat >= timing["warmup"]:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _step(torch: Any, n: int, launch_one: Callable[[int], Any], streams: list | None) -> tuple[float, list[float], list]:
    """One synchronous step of n tenants: (wall seconds, per-tenant GPU seconds, outputs)."""
    main = torch.cuda.current_stream()
    begin = torch.cuda.Event(enable_timing=True)
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    outs = []
    start = time.perf_counter()
    begin.record(main)
    for i in range(n):
        if streams is None:
            outs.append(launch_one(i))
            ends[i].record(main)
        else:
            stream = streams[i]
            stream.wait_event(begin)
            with torch.cuda.stream(stream):
                outs.append(launch_one(i))
                ends[i].record(stream)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return wall, [begin.elapsed_time(end) / 1e3 for end in ends], outs
