"""Run by tests/test_distributed.py under torchrun: a few DiT training steps through the shared
accelerate loop in 2 CPU processes (gloo), then report a hash of each replica's weights."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from easyanimate.config import TrainStageConfig
from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.training.common import make_accelerator, step_generator, train_loop


def main(out_dir: str) -> None:
    torch.manual_seed(0)  # same init on every rank, as from_pretrained would give
    model = EasyAnimateTransformer3DModel(hidden_size=32, depth=2, num_heads=2, text_embed_dim=16)
    accelerator = make_accelerator("no")
    rank = accelerator.process_index
    cfg = TrainStageConfig(steps=3, batch_size=2, learning_rate=1e-3, checkpoint_every=100)

    def compute_loss(dit, step):
        # Different data per rank: only gradient all-reduce can keep the replicas identical.
        g = step_generator(1000 + rank, step)
        x = torch.randn(2, 4, 2, 8, 8, generator=g)
        text = torch.randn(2, 4, 16, generator=g)
        return torch.nn.functional.mse_loss(
            dit(x, torch.tensor([5, 500]), text).sample, torch.randn(x.shape, generator=g)
        )

    result = train_loop(
        accelerator=accelerator,
        model=model,
        trainable=model.parameters(),
        cfg=cfg,
        compute_loss=compute_loss,
        ckpt_dir=Path(out_dir) / "ckpt",
        name="dist",
        show_progress=False,
    )
    weights = accelerator.unwrap_model(model).state_dict()
    digest = hashlib.sha256(b"".join(weights[k].detach().numpy().tobytes() for k in sorted(weights))).hexdigest()
    (Path(out_dir) / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world": accelerator.num_processes,
                "backend": str(accelerator.state.backend),
                "digest": digest,
                "losses": result.losses,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
