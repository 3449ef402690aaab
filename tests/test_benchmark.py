"""benchmark.py --profile's account of the idle GPU, on a hand-made trace: the timed runs themselves need a GPU."""
import benchmark


def span(cat, name, ms, dur, tid, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ms * 1000, "dur": dur * 1000, "tid": tid}  # traces count us
    return event | ({"args": {"correlation": correlation}} if correlation is not None else {})


def test_idle_gpu_is_charged_to_what_the_launching_thread_was_doing(capsys):
    """The GPU idles from 40 to 80 ms (between two kernels) and from 95 to 100. The first gap: the thread that
    launches the second kernel spends 40-60 in its outer op and 60-80 in aten::add, which launches it; another
    thread's work at that time is not charged. The second gap: the kernel was queued at 50, before the GPU went
    idle, so the CPU is not the reason."""
    events = [
        span("cpu_op", "outer", 0, 100, tid=1),
        span("cpu_op", "aten::mm", 10, 20, tid=1),
        span("cuda_runtime", "cudaLaunchKernel", 25, 2, tid=1, correlation=1),
        span("cuda_runtime", "cudaLaunchKernel", 50, 2, tid=1, correlation=3),
        span("cpu_op", "aten::add", 60, 20, tid=1),
        span("cuda_runtime", "cudaLaunchKernel", 75, 2, tid=1, correlation=2),
        span("cpu_op", "aten::other_thread", 40, 40, tid=2),
        span("kernel", "k1", 30, 10, tid=7, correlation=1),
        span("kernel", "k2", 80, 15, tid=7, correlation=2),
        span("kernel", "k3", 100, 10, tid=7, correlation=3),
    ]
    benchmark.idle_gpu(events, steps=1)
    out = capsys.readouterr().out
    assert "GPU idle 45.0 ms per step of 80.0 (2 gaps); 5.0 ms of it with the next kernel already queued" in out
    inner, outer = out.split("| outermost |")
    assert rows(inner) == {"outer": 20.0, "aten::add": 20.0}
    assert rows(outer) == {"outer": 40.0}


def rows(table: str) -> dict[str, float]:
    cells = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {name.strip(): float(ms) for name, ms in cells if "ms per step" not in ms and "CPU op" not in name}
