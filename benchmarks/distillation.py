"""Step time of KnowledgeDistillation vs plain Lightning on the reference ViT job, next to the
FLOP-predicted cost.

A teacher of the student's own architecture (configs/vit_digits.yaml; random weights: the time
does not depend on them) adds its forward to every step: FLOPs predict (S + T) / S, with S the
student's training FLOPs and T the teacher's forward (about S / 3). Variants alternate over
rounds in one process; printed: median ms per optimizer step (first step excluded), the ratio
to dense, and the FLOP-predicted ratio.

    python benchmarks/distillation.py [--steps 120] [--rounds 5]
"""

from __future__ import annotations

import os
import tempfile

import torch
from lightning_steps import arguments, build, compare

from lit_eff.callbacks import KnowledgeDistillation
from lit_eff.flops import count_flops


def main() -> None:
    args = arguments(__doc__.split("\n")[0])
    model, data = build()
    folder = tempfile.mkdtemp(prefix="lit_eff_kd_bench_")
    teacher = os.path.join(folder, "teacher.ckpt")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, teacher)
    variants = {
        "dense": lambda m: [],
        "KD, logits": lambda m: [KnowledgeDistillation(teacher)],
        "KD, logits + hint on blocks.3": lambda m: [KnowledgeDistillation(teacher, features={"blocks.3": "blocks.3"})],
    }
    median = compare(variants, args.steps, args.rounds)
    x = torch.zeros(data.batch_size, 1, 8, 8)
    student = count_flops(lambda: model(x)).total
    with torch.no_grad():
        forward = count_flops(lambda: model(x), backward=False).forward
    print(f"  FLOP-predicted KD/dense x{(student + forward) / student:.3f}; measured x"
          f"{median['KD, logits'] / median['dense']:.3f}")


if __name__ == "__main__":
    main()
