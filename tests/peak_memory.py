"""Peak tensor memory of a call, from torch.profiler's allocation events (exact on CPU, unlike process RSS)."""

from torch.profiler import ProfilerActivity, profile


def peak_tensor_bytes(fn) -> int:
    """Bytes allocated at the peak while ``fn()`` runs, counted from its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak
