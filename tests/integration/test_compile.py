"""--torch_compile through the real Trainer: compiled once before step 1 (perf/compile_s), never recompiled by
validation or sampling, resumed bit-exactly by a compiled run, and equal to the eager run to float tolerance.

One test on purpose: inductor's first compile costs tens of seconds of CPU (later ones load its cache).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_optim.trainer import Trainer

# the smallest UNet with an attention block: compile time grows with the graph
MICRO_UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(cfg) -> None:
    torch._dynamo.reset()  # each Trainer compiles afresh (from inductor's cache), as a new process would
    Trainer(cfg).train()


@pytest.mark.slow
def test_compiled_run_never_recompiles_resumes_bit_exact_and_matches_eager(tiny_config, tmp_path, monkeypatch):
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps(MICRO_UNET))
    # a guard failure (another batch size, eval mode, no_grad) would recompile: make it an error instead
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    flags = ["--model_config_name_or_path", str(unet), "--resolution", "8", "--train_batch_size", "4",
             "--max_train_steps", "4", "--logging_steps", "2", "--validation_steps", "2", "--sample_steps", "2",
             "--checkpointing_steps", "2", "--use_ema", "--num_validation_images", "6"]

    def config(name: str, *extra: str):
        cfg = tiny_config(*flags, *extra)
        cfg.output_dir = str(tmp_path / name)
        return cfg

    _train(config("straight", "--torch_compile"))
    _train(config("resumed", "--torch_compile", "--stop_after_steps", "2"))
    _train(config("resumed", "--torch_compile", "--resume_from_checkpoint", "latest"))
    _train(config("eager"))

    straight, resumed, eager = (_records(tmp_path / n) for n in ("straight", "resumed", "eager"))
    assert straight[0]["perf/compile_s"] > 0 and "perf/compile_s" not in straight[1]
    assert "perf/compile_s" not in eager[0]
    drop = ("perf/", "elapsed_s")  # timings differ; everything else is the same maths

    def maths(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in records]

    assert maths(straight) == maths(resumed)
    weights = [load_file(tmp_path / n / "unet" / "diffusion_pytorch_model.safetensors")
               for n in ("straight", "resumed", "eager")]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)
        # Adam divides by sqrt(v): a float-rounding difference in a near-zero gradient can move a weight by a
        # few percent of one step (lr 1e-3); 1e-4 is a tenth of a step
        torch.testing.assert_close(weights[0][key], weights[2][key], rtol=1e-3, atol=1e-4)
    for a, b in zip(maths(straight), maths(eager)):
        assert a.keys() == b.keys()
        for key in a:
            if a[key] is None or b[key] is None:  # a bucket no sample of the log window fell in is null in both
                assert a[key] is b[key], key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
