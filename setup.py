"""Package list only: `kernels/` and `eval/` ship inside the `compress` namespace (see pyproject.toml)."""
from setuptools import find_packages, setup


def _under(prefix: str, folder: str) -> list[str]:
    return [prefix] + [f"{prefix}.{name}" for name in find_packages(folder)]


setup(packages=_under("compress", "compress") + _under("compress.kernels", "kernels") + _under("compress.eval", "eval"))
