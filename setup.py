"""layercache: layer caching (early-exit cache heads) for TorchServe image classifiers."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="layercache",
    version="0.2.0",
    description="Layer caching for TorchServe image classifiers (Abedi et al.): record, build, serve, swap",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["layercache", "layercache.*"]),
    # The handler files shipped in every .mar and TorchServe's log configuration travel with the package.
    package_data={"layercache": ["handlers/*.py", "resources/*.xml"]},
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
        "scipy",
    ],
    extras_require={"accel": ["onnxruntime", "onnx", "torchao"]},
    # The commands are library modules (layercache/cli/); tools/*.py run the same ones from a checkout.
    entry_points={
        "console_scripts": [
            "layercache-wrap=layercache.cli.wrap:main",
            "layercache-record=layercache.cli.record:main",
            "layercache-build=layercache.cli.build:main",
            "layercache-swap=layercache.cli.swap:main",
            "layercache-refresh=layercache.cli.refresh:main",
        ]
    },
)
