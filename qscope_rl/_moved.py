"""Old module paths from before the wings (0.1.0's flat layout), kept importable.

`import qscope_rl.detection` still works and yields `qscope_rl.features.detection` itself (the same module
object, so monkeypatching either name patches both), with a DeprecationWarning naming the new path. The
README's changelog lists the same table.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED_MODULES: dict[str, str] = {
    "qscope_rl.loaders": "qscope_rl.sae.loaders",
    "qscope_rl.releases": "qscope_rl.sae.releases",
    "qscope_rl.aux_loss": "qscope_rl.features.aux_loss",
    "qscope_rl.detection": "qscope_rl.features.detection",
    "qscope_rl.discovery": "qscope_rl.features.discovery",
    "qscope_rl.feature_pack": "qscope_rl.features.feature_pack",
    "qscope_rl.probe": "qscope_rl.features.probe",
    "qscope_rl.text_features": "qscope_rl.features.text_features",
    "qscope_rl.classify": "qscope_rl.tools.classify",
    "qscope_rl.redundancy": "qscope_rl.tools.redundancy",
    "qscope_rl.steered_generation": "qscope_rl.tools.steered_generation",
    "qscope_rl.steering": "qscope_rl.tools.steering",
    "qscope_rl.synthesize": "qscope_rl.tools.synthesize",
    "qscope_rl.demo_report": "qscope_rl.demo.report",
    "qscope_rl.cli_demo": "qscope_rl.cli.demo",
    "qscope_rl.cli_features": "qscope_rl.cli.features",
    "qscope_rl.cli_sae": "qscope_rl.cli.sae",
    "qscope_rl.cli_train": "qscope_rl.cli.train",
    "qscope_rl.cli_utilities": "qscope_rl.cli.utilities",
    "qscope_rl.world.cli": "qscope_rl.cli.world",
    "qscope_rl.trainers.dry_run": "qscope_rl.trainers.launch.dry_run",
    "qscope_rl.trainers.recipe": "qscope_rl.trainers.launch.recipe",
    "qscope_rl.trainers.run_args": "qscope_rl.trainers.launch.run_args",
    "qscope_rl.trainers.world_defaults": "qscope_rl.trainers.launch.world_defaults",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new_name}; import it from there", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:
        pass  # the module under its new name is already executed


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        new_name = MOVED_MODULES.get(name)
        if new_name is None:
            return None
        return importlib.util.spec_from_loader(name, _MovedModuleLoader(new_name))


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
