"""The demo wing: the main job (`qscope-rl demo`), its report, and the measurements the benchmarks share.

`main_job` trains the GRPO arms on the embedded demo world and judges every policy on held-out prompts;
`report` turns the result into markdown, JSON and plots; `measures` holds the world-judged measures of the
utilities (steering rates, the classification curve, benchmarks of known overlap). The top floor: it builds
on every other wing and nothing imports it.
"""

from .main_job import ARMS, CURVES, MEASURES, DemoSettings, evaluate, run_demo, summarize
from .report import checks, markdown, write_report

__all__ = ["ARMS", "CURVES", "MEASURES", "DemoSettings", "checks", "evaluate", "markdown", "run_demo", "summarize",
           "write_report"]
