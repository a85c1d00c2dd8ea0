"""layercache: layer caching (early-exit cache heads) for TorchServe image classifiers."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="layercache",
    version="0.1.0",
    description="Layer caching for TorchServe image classifiers (Abedi et al.): record, build, serve, swap",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["layercache", "layercache.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "torchserve==0.12.0",
        "torch-model-archiver==0.12.0",
        "pyyaml",
        "captum",
        "pandas",
        "pyarrow",
        "numpy",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    # The tools live in the source tree (python tools/build_cache.py ...); the console scripts call them.
    py_modules=[],
    entry_points={
        "console_scripts": [
            "layercache-wrap=layercache.entry:wrap_mar",
            "layercache-record=layercache.entry:record",
            "layercache-build=layercache.entry:build_cache",
            "layercache-swap=layercache.entry:swap_version",
        ]
    },
)
