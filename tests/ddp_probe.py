"""Launched by test_ddp.py under `accelerate launch --multi_gpu --num_processes 2`: one epoch of real DDP
training steps of the configured objective with imcap's own pieces, then each rank writes what it saw to
OUT/rank<r>.json."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from imcap.checkpoint import TrainState
from imcap.config import load_config
from imcap.data.prefetch import DeviceBatches
from imcap.data.streams import batches_per_epoch
from imcap.data.training_data import prepare_data
from imcap.distributed import part_of
from imcap.model import Captioner
from imcap.objectives import make_objective
from imcap.runtime import start_process
from imcap.train import make_optimizer, train_step

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", overrides)
    acc = start_process(cfg)  # seeded
    data = prepare_data(cfg, acc)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)  # where self-critical training counts its document frequencies
    objective = make_objective(cfg, data, acc, None)
    model = Captioner(cfg.model, len(data.vocab), data.vocab.pad)
    optimizer, scheduler = make_optimizer(model, cfg, 100)
    model, optimizer = acc.prepare(model, optimizer)
    num_batches = batches_per_epoch(data.num_train_samples, cfg.data.batch_size, acc.num_processes, 1)
    seen, batches = [], 0
    for batch in DeviceBatches(data.train_loader(part_of(acc), TrainState(), num_batches), acc.device):
        train_step(model, optimizer, scheduler, [batch], objective, cfg, acc)
        seen += batch.image_ids
        batches += 1
    params = torch.cat([p.detach().flatten() for p in acc.unwrap_model(model).parameters()])
    (out / f"rank{acc.process_index}.json").write_text(
        json.dumps(
            {
                "world_size": acc.num_processes,
                "backend": str(torch.distributed.get_backend()) if acc.num_processes > 1 else None,
                "seen": seen,
                "batches": batches,
                "steps": scheduler.last_epoch,
                "params": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
                "objective": hashlib.sha256(
                    b"".join(t.numpy().tobytes() for t in objective.state_dict().values())
                ).hexdigest(),
            }
        )
    )
