"""Only the package list, which pyproject.toml cannot compute: every package under memlm/ (so a new
memory mode's package needs no entry anywhere) plus the three top-level folders mapped into the
memlm namespace (pyproject.toml's [tool.setuptools.package-dir])."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["memlm", "memlm.*"]) + ["memlm.index", "memlm.kernels", "memlm.services"])
