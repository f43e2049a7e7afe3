"""Shifter: run Docker/OCI images as Slurm jobs (Python core, SPANK plugin, gateway)."""

from setuptools import find_packages, setup

setup(
    name="shifter-core",
    version="0.1.0",
    description="Shifter rebuilt in Python: image gateway, container runtime, Slurm plugin",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.11",
    install_requires=[
        "pyyaml>=6",
        "cffi>=1.15",
        "httpx>=0.27",
        "zstandard>=0.22",
        "isal>=1.6",  # ISA-L gzip: layers decompress 2-3x faster than with zlib
        "starlette>=0.37",
        "uvicorn>=0.29",
        "rich>=13",
        "prometheus_client>=0.17",  # the gateway's /metrics
        "oras>=0.2.25,<0.3",  # images as OCI artifacts (image/artifact.py)
    ],
    # shifter_core._syscalls: mount, unshare, loop ioctls ... (compiled, cffi API mode).
    setup_requires=["cffi>=1.15"],
    cffi_modules=[
        "cffi_build/build_syscalls.py:ffibuilder",
        "cffi_build/build_munge.py:ffibuilder",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "ruff",
            "mypy==2.4.1",
            "types-PyYAML",
            "types-cffi",
        ],
    },
    entry_points={
        "console_scripts": [
            "shifter=shifter_core.cli.shifter:main",
            "shifterimg=shifter_core.cli.shifterimg:main",
            "shifteradm=shifter_core.cli.shifteradm:main",
            "shifter-gateway=shifter_core.gateway.server:main",
        ]
    },
)
