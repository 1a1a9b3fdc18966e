"""The demo wing: the main job (`qscope-rl demo`), its report, and the measurements the benchmarks share.

`main_job` trains the GRPO arms (and the SFT table, `sft`) on the embedded demo world and judges every policy on
held-out prompts (`policy_measure`, with bootstrap intervals from `stats`; amplification chosen by `amplify`, the
SAE penalty calibrated by `calibration`);
`report` turns the result into markdown, JSON and plots; `measures` holds the world-judged measures of the
utilities (steering rates, the classification curve, benchmarks of known overlap). The top floor: it builds
on every other wing and nothing imports it.
"""

from .main_job import ARMS, CURVES, DemoSettings, run_demo
from .policy_measure import MEASURES
from .report import analyse, checks, markdown, write_report

__all__ = ["ARMS", "CURVES", "MEASURES", "DemoSettings", "analyse", "checks", "markdown", "run_demo", "write_report"]
