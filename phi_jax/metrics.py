"""Training throughput accounting (FLOPs, MFU) and the metrics writers.

FLOPs per trained token, as PaLM (Chowdhery et al. 2022, appendix B) counts them:
    6 * N            matmul params N (all params but the embedding table, which is a lookup),
                     2 FLOPs per multiply-add, x3 for forward + backward
  + 12 * L * D * T   attention scores and weighted values: 2 matmuls of T x D per token and layer,
                     2 FLOPs each, x3 for forward + backward; causal masking is not discounted
MFU = achieved FLOP/s / (devices x the chip's peak dense bf16 FLOP/s).
"""

import json
import pathlib

import jax

from phi_jax.config import PhiConfig

# Peak dense bf16 TFLOP/s per chip, matched against jax's device_kind (longest match wins).
PEAK_TFLOPS = {
    "A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def train_flops_per_token(config: PhiConfig, seq_len: int) -> float:
    matmul_params = config.num_params - config.vocab_size * config.hidden_size
    return 6.0 * matmul_params + 12.0 * config.num_layers * config.hidden_size * seq_len


def peak_tflops_per_device(device=None) -> float | None:
    """The chip's peak, or None where unknown (CPUs); pass `peak_tflops` to the trainer there."""
    kind = (device or jax.devices()[0]).device_kind
    matches = [name for name in PEAK_TFLOPS if name.lower() in kind.lower()]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def mfu(tokens_per_sec: float, flops_per_token: float, peak_tflops: float | None, num_devices: int):
    if not peak_tflops:
        return None
    return tokens_per_sec * flops_per_token / (peak_tflops * 1e12 * num_devices)


class MetricsWriter:
    """One JSON object per line in WORKDIR/metrics.jsonl, and TensorBoard scalars beside it.

    Only process 0 writes; the others get a writer that does nothing.
    """

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a")
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
