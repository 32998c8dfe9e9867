"""How dsagen times a kernel call: every speed number (bench, tuning) comes from these medians."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def cuda_events_ms(fn: Callable[[], object], warmup: int = 100, rep: int = 500) -> float:
    """Median of triton.testing.do_bench: CUDA events around each call, L2 flushed in between."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def cuda_graph_ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median of CUDA-graph replays of `fn`: no host overhead, so busy CPUs cannot inflate it."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def cpu_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """CPU kernels run synchronously: wall-clock median of `reps` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def calls_ms(fn: Callable[[], object], calls: int = 1) -> float:
    """Median wall-clock ms of `calls` calls of a synchronous (CPU) kernel, each timed alone (a
    call that another process preempted weighs as one of many), with no warm-up of its own: the
    rounds of interleaved_ms warm each side up for the next."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: list[Callable[[], object]], rounds: int,
                   timer: Callable[[Callable[[], object]], float]) -> list[list[float]]:
    """Each of `fns` timed once per round by `timer`, in turns: A B, then B A, and so on.

    Two schedules timed one after the other can differ by how the machine drifts in between (a CPU
    warming up, clocks boosting, another process starting); taken in turns, with the order flipped
    every round, drift weighs on every side alike, and the medians of the rounds compare them.
    """
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(float(timer(fns[i])))
    return times


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 2):
    """(graph, outputs): `fn` run `warmup` times on a side stream (allocator and caches settle),
    then captured once; graph.replay() reruns it into the same outputs."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs
