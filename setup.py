import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    scope = {}
    with open(os.path.join(HERE, "opacus", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def read_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf8") as f:
        return f.read()


setup(
    name="opacus",
    version=read_version(),
    description="Train PyTorch models with differential privacy",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["opacus", "opacus.*"]),
    # torch 2.2: torch.autograd.graph.GradientEdge (see website/docs/installation.md)
    install_requires=["numpy>=1.15", "scipy>=1.2", "torch>=2.2"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "flake8",
            "isort",
            "black",
            "dp-accounting",
            "pyyaml",
            "scikit-learn",
            "tqdm",
            "matplotlib",
            "nbformat",
            "nbclient",
            "ipykernel",
            "mkdocs>=1.6",
            "pytorch-lightning>=2.6",
        ],
        "examples": ["scikit-learn", "tqdm", "matplotlib"],
        # opacus.integrations.transformers (DPTrainer), examples/finetune_lm.py
        "transformers": ["transformers>=5.0", "peft>=0.15"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
