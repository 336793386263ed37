# megatron_simpo on the NGC PyTorch container (CUDA, torch, Transformer Engine, Apex, Python 3.12).
# The container's torch is kept: this package is installed without dependencies, and its own
# pure-Python dependencies are added without touching torch.
#   docker build -t megatron-simpo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v /ckpt:/ckpt megatron-simpo \
#       bash examples/train_simpo_llama3.sh
ARG NGC_PYTORCH=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${NGC_PYTORCH}

WORKDIR /workspace/megatron_simpo
COPY setup.py README.md Makefile ./
COPY megatron_simpo ./megatron_simpo
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests
COPY docs ./docs
COPY pytest.ini ./

# Record the container's torch, then install; fail the build if anything replaced it.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-version \
 && (python -c "import megatron.core" 2>/dev/null || pip install --no-deps "megatron-core>=0.16.1") \
 && pip install --no-deps -e . \
 && pip install "transformers>=4.45" "datasets>=2.19" "safetensors>=0.4" "psutil>=5.9" einops tqdm "pytest>=7" \
 && python -c "import torch, sys; sys.exit(torch.__version__ != open('/tmp/torch-version').read().strip())" \
 && python -c "import megatron.core, megatron_simpo; print('megatron-core', megatron.core.__version__)"

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
