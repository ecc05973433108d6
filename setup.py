"""Which packages the distribution installs (everything else is in pyproject.toml).

``hierarchy/`` as it is, plus the repository's top-level ``registry/`` and ``stages/`` folders installed
under the ``hierarchy`` namespace (``hierarchy.registry``, ``hierarchy.stages``), so nothing with a
generic name lands in site-packages. Subpackages are found, not listed, so the list cannot drift.
"""
from setuptools import find_packages, setup

MAPPED = {"registry": "hierarchy.registry", "stages": "hierarchy.stages"}  # folder -> package

packages = find_packages(include=["hierarchy", "hierarchy.*"])
package_dir = {}
for folder, name in MAPPED.items():
    package_dir[name] = folder
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=packages, package_dir=package_dir)
