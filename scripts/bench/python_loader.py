"""torchvision ImageFolder + DataLoader with the training transforms loratune uses, for comparison.
usage: python_loader.py FOLDER BATCH WORKERS BATCHES  -> one JSON line"""
import json
import sys
import time

import torch
from torchvision import datasets, transforms


def main():
    folder, batch, workers, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    t = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder, t), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # warm-up: workers started, first batch decoded
    t0, images = time.perf_counter(), 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        images += x.shape[0]
    dt = time.perf_counter() - t0
    print(json.dumps({"images_per_s": images / dt, "images": images}))


if __name__ == "__main__":
    main()
