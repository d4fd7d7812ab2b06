"""Packaging hook: a built wheel carries configs/ (the single source of the YAML configs) as
sbora/configs/, so a non-editable install finds its method, training and model
configs. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "configs"
        if source.is_dir() and not self.editable_mode:
            shutil.copytree(source, Path(self.build_lib) / "sbora" / "configs", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConfigs})
