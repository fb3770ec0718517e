"""Fine-tune a Llama-3 model into a Lynx judge with FSDP2 (see lynx/train/ and configs/).

    python train.py --config configs/tiny-cpu.yaml                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py --config configs/lynx-8b.yaml   # one node
    python train.py --help                                               # every config key
"""

import sys

from lynx.train import main

if __name__ == "__main__":
    sys.exit(main())
