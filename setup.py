"""The package list (everything else is in pyproject.toml): the packages found in the checkout, plus
``pillsnap_dali.configs``, which pyproject.toml's ``package-dir`` maps to the top-level ``configs/`` folder
(a found-packages table cannot name a package that has no folder of its own)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["pillsnap_dali*", "pipelines*"]) + ["pillsnap_dali.configs"])
