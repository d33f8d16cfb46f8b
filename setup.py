"""Install the top-level folders as subpackages of the `moescope` namespace.

The bare names (probe, kernels, analysis, collector, dashboard) are taken on PyPI and
`kernels` would shadow the package transformers uses, so each folder is mapped to
`moescope.<folder>`; subpackages are discovered so new ones need no edit here.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
FOLDERS = {"moescope": "moescope", **{f"moescope.{d}": d for d in ("probe", "collector", "analysis", "dashboard", "kernels")}}


def discover():
    packages, package_dir = [], {}
    for name, folder in FOLDERS.items():
        package_dir[name] = folder
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            if any(part.startswith((".", "__")) for part in rel.parts):
                continue
            sub = ".".join((name, *rel.parts)) if rel.parts else name
            packages.append(sub)
            package_dir[sub] = str(init.parent.relative_to(ROOT))
    return packages, package_dir


packages, package_dir = discover()
setup(packages=packages, package_dir=package_dir, include_package_data=True,
      package_data={"moescope.dashboard": ["assets/*"]})
