"""fastmcl: fast online knowledge distillation (L-MCL, MCL, PCL and baselines).

`kernels/` ships as `fastmcl.kernels` so it never collides with other distributions that own a top-level `kernels`.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastmcl", "fastmcl.*"]) + ["fastmcl.kernels"]

setup(
    name="fastmcl",
    version="0.1.0",
    description="Fast online knowledge distillation: L-MCL, MCL, PCL and baselines with a verified reference path",
    packages=packages,
    package_dir={"fastmcl.kernels": "kernels"},
    python_requires=">=3.10",
    # torch is pinned by the Makefile before this install (CPU build from local disk here, CUDA build on a GPU box);
    # a range here keeps a bare `pip install .` from replacing it.
    install_requires=[
        "torch>=2.11,<2.16",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "scikit-learn",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark"],
        "triton": ["triton"],
        "dali": ["nvidia-dali-cuda130>=2.4"],   # --dali (fastmcl.data.dali); tested with 2.4.0
    },
)
