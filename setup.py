import re
from pathlib import Path

from setuptools import find_packages, setup

# The one place the version is written is the package itself.
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "src/ijepa_scale/__init__.py").read_text(),
                    re.M).group(1)
TRACKERS = {"wandb": ["wandb>=0.31"], "mlflow": ["mlflow-skinny>=3.18,<4"]}  # mlflow-skinny: no server, no SQL store

setup(
    name="ijepa-scale",
    version=VERSION,
    description="Launcher and pipeline for large-scale I-JEPA pretraining",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"ijepa_scale.launchers": ["presets/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "pyyaml",
        "webdataset",
        "fsspec",
        "pandas",
        "numpy",
        "pillow",
        "submitit",
        "aiohttp",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "s3": ["s3fs"],
        "gcs": ["gcsfs"],
        "hf": ["transformers"],
        "tensorboard": ["tensorboard"],
        **TRACKERS,
        "umap": ["umap-learn"],
        "dev": ["pytest", "pytest-timeout", "scikit-image", "scikit-learn", "transformers", "tensorboard", "s3fs",
                "moto[server]", *TRACKERS["wandb"], *TRACKERS["mlflow"]],
    },
    entry_points={"console_scripts": ["ijepa-scale=ijepa_scale.cli:main"]},
)
