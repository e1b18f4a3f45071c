"""Images per second of the training data paths, to tell whether data or the model bounds a step.

    python train/bench_loader.py imagefolder --images 3000 --workers 16        # ImageNet-style folder, 224 px
    python train/bench_loader.py augment32 --device cuda --workers 4           # CIFAR-size: device vs timm CPU

The logic (and every option) lives in ``diffvision.experiments.loader_bench``.
"""
from diffvision.experiments.loader_bench import main

if __name__ == "__main__":
    main()
