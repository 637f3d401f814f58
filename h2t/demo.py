"""`h2t demo`: the whole pipeline on the embedded digits, no servers and no downloads."""

from __future__ import annotations

import tempfile
from pathlib import Path

from models.config import AugmentConfig, BuiltinDataset, LocalTrainConfig, Stage1Config, Stage2Config

# scikit-learn's real 8x8 handwritten digits (shipped in its wheel), made long-tailed: 144 down to 7
# training images per class, 30 balanced test images per class. Trains in well under a minute on a CPU.
DEMO_CONFIG = LocalTrainConfig(
    dataset=BuiltinDataset(builtin="digits", imbalance_factor=0.05),
    augment=AugmentConfig(horizontal_flip=False),  # a mirrored digit is not the same digit
    stage1=Stage1Config(epochs=20, batch_size=32, lr=0.02, weight_decay=5e-4, schedule="cosine",
                        warmup_epochs=2, mixup_alpha=0.0),
    stage2=Stage2Config(method="h2t", rho=0.25, epochs=10, batch_size=32, lr=0.02, weight_decay=5e-4),
)


def run_local_demo(out_dir: Path | None = None) -> int:
    from models.data import load_dataset
    from models.reporting import epoch_line, group_table
    from models.train import resolve_device, train_two_stage

    dataset = load_dataset(DEMO_CONFIG.dataset)
    device = resolve_device()
    print(f"demo: {dataset.name}, {len(dataset.train)} long-tailed training images "
          f"(per class {dataset.train_counts()}), {len(dataset.test)} test images, device {device}", flush=True)
    with tempfile.TemporaryDirectory(prefix="h2t-demo-") as tmp:
        result = train_two_stage(dataset, DEMO_CONFIG, out_dir or Path(tmp), device,
                                 on_epoch=lambda m: print(epoch_line(m), flush=True))
    s1, s2 = result.stage1[-1], result.stage2[-1]
    print(f"\nstage 1 (CE) last epoch: top-1 {100 * s1.top1:.2f}%, few-shot {100 * s1.few:.2f}%")
    print(f"stage 2 (H2T, rho {DEMO_CONFIG.stage2.rho}) last epoch: top-1 {100 * s2.top1:.2f}%, "
          f"few-shot {100 * s2.few:.2f}%\n")
    print(group_table(result.report, dataset.train_counts(), result.groups))
    return 0
