"""The paper's numbers, as data, in one place: what the report sets beside a run's own.

Every number is copied from the LEASE paper's text (`shared/papers/lease-paper.txt`): the main tables 1–5, 7
and 8 and the supplement's C.8 / C.9; the setting they were measured in is table A.1 (pretraining), A.2
(linear probe), A.3 (fine-tuning), A.4 (few-shot) and A.6 (robustness sets). Rows are keyed by the paper's
method name (`PAPER_ROW` maps `pretrain.method` to it); accuracies are top-1 in %.
"""
from __future__ import annotations

# The setting every main-table number comes from (tables A.1-A.4): ImageNet-1K, ViT-B, 1600 epochs.
PAPER_SETTING = {"data": "ImageNet-1K", "train_images": 1_281_167, "val_images": 50_000, "classes": 1000,
                 "model": "ViT-B", "embed_dim": 768, "depth": 12, "epochs": 1600}
FID_SAMPLES = 50_000  # unconditional FID / IS over 50K generated images (MAGE's protocol)
CONDITIONAL_SAMPLES_PER_CLASS = 50  # 50K class-conditional samples over the 1000 classes
FEWSHOT_EPOCHS = 10  # table A.4 (and §4.2: "we linear probe every model for 10 epochs")

# pretrain.method -> the paper's row for that method. `mage` (reconstruction only on precomputed tokens) has
# no row: the paper's MAGE tokenizes online (`mage_online`).
PAPER_ROW = {"lease": "LEASE", "sorcen": "Sorcen", "mage_online": "MAGE"}

TABLES: dict[str, dict] = {
    "1": {"what": "linear probe (table A.2 recipe) and unconditional generation on IN-1K",
          "rows": {"LEASE": {"linear_probe_top1": 76.7, "fid": 9.62, "isc": 91.78},
                   "Sorcen": {"linear_probe_top1": 75.1, "fid": 9.61, "isc": 90.96},
                   # table 1 lists MAGE twice (74.7 / 11.1 / 81.17 and 75.0 / 10.88 / 81.59): the first is kept
                   "MAGE": {"linear_probe_top1": 74.7, "fid": 11.1, "isc": 81.17}}},
    "2": {"what": "few-shot linear probe, shots per IN-1K class, 10 epochs (table A.4)",
          "rows": {"LEASE": {"5": 51.00, "10": 59.39, "13": 62.00, "25": 66.19, "avg": 59.65},
                   "Sorcen": {"5": 50.30, "10": 59.21, "13": 61.73, "25": 65.13, "avg": 59.09},
                   "MAGE": {"5": 48.44, "10": 57.37, "13": 59.84, "25": 63.66, "avg": 57.33}}},
    "3": {"what": "full fine-tuning on IN-1K (table A.3: 100 epochs)",
          "rows": {"LEASE": {"top1": 82.7, "top5": 96.1}, "Sorcen": {"top1": 82.4, "top5": 96.0},
                   "MAGE": {"top1": 82.5}}},
    # Transfer: the supplement (§C) calls table 4 the 16-shot setting; C.8 is 8-shot and C.9 4-shot.
    "4": {"what": "transfer, 16-shot linear probe per dataset (supplement §C)", "shots": "16",
          "rows": {"LEASE": {"caltech101": 89.82, "ucf101": 62.23, "sun397": 54.71, "dtd": 50.53, "cifar100": 63.61,
                             "cifar10": 81.21, "places365": 35.36},
                   "Sorcen": {"caltech101": 89.61, "ucf101": 62.44, "sun397": 53.26, "dtd": 53.84, "cifar100": 59.00,
                              "cifar10": 80.27, "places365": 32.82},
                   "MAGE": {"caltech101": 88.97, "ucf101": 59.66, "sun397": 52.36, "dtd": 53.90, "cifar100": 61.39,
                            "cifar10": 83.60, "places365": 32.35}}},
    "C.8": {"what": "transfer, 8-shot", "shots": "8",
            "rows": {"LEASE": {"caltech101": 87.06, "ucf101": 50.91, "sun397": 47.86, "dtd": 42.02, "cifar100": 56.60,
                               "cifar10": 72.99, "places365": 31.12},
                     "Sorcen": {"caltech101": 85.31, "ucf101": 50.70, "sun397": 44.65, "dtd": 39.60,
                                "cifar100": 49.73, "cifar10": 65.02, "places365": 27.32},
                     "MAGE": {"caltech101": 83.94, "ucf101": 46.37, "sun397": 43.38, "dtd": 40.13, "cifar100": 53.08,
                              "cifar10": 75.02, "places365": 27.00}}},
    "C.9": {"what": "transfer, 4-shot", "shots": "4",
            "rows": {"LEASE": {"caltech101": 78.22, "ucf101": 39.62, "sun397": 36.77, "dtd": 27.01, "cifar100": 47.42,
                               "cifar10": 44.04, "places365": 24.72},
                     "Sorcen": {"caltech101": 69.20, "ucf101": 36.35, "sun397": 33.48, "dtd": 21.99,
                                "cifar100": 35.58, "cifar10": 34.44, "places365": 20.32},
                     "MAGE": {"caltech101": 71.72, "ucf101": 29.71, "sun397": 31.36, "dtd": 19.92, "cifar100": 40.03,
                              "cifar10": 35.06, "places365": 19.81}}},
    "5": {"what": "robustness: k-NN with the IN-1K train bank (sets of table A.6; ImageNet-C at severities 4, 5)",
          "rows": {"LEASE": {"imagenet-val": 62.60, "imagenet-v2": 49.14, "imagenet-sketch": 19.48,
                             "imagenet-r": 28.04, "imagenet-a": 8.51, "objectnet": 21.61, "imagenet-c-s4": 30.24,
                             "imagenet-c-s5": 20.39},
                   "Sorcen": {"imagenet-val": 62.23, "imagenet-v2": 48.35, "imagenet-sketch": 14.62,
                              "imagenet-r": 25.27, "imagenet-a": 5.47, "objectnet": 13.52, "imagenet-c-s4": 22.15,
                              "imagenet-c-s5": 14.42},
                   "MAGE": {"imagenet-val": 60.65, "imagenet-v2": 45.94, "imagenet-sketch": 14.09,
                            "imagenet-r": 22.32, "imagenet-a": 4.19, "objectnet": 10.31, "imagenet-c-s4": 21.96,
                            "imagenet-c-s5": 13.69}}},
    "7": {"what": "class-conditional generation (decoder fine-tuned with the class token and centroid tail, "
                  "table A.5)",
          "rows": {"LEASE": {"fid": 3.72, "isc": 179.09}, "MAGE": {"fid": 6.93, "isc": 195.8}}},
    # Table 8 rows by where the codebook contrast acts (`pretrain.model.contrast_on`); its LEASE row
    # (76.11) is below table 1's 76.7, so these runs are shorter than 1600 epochs (the paper does not say how long).
    "8": {"what": "ablations: reconstruction (Rec.) with the codebook contrast on decoder (DC) / encoder (EC)",
          "rows": {"none": {"linear_probe_top1": 73.62, "fid": 10.62, "isc": 79.59},
                   "decoder": {"linear_probe_top1": 74.20, "fid": 10.97, "isc": 78.73},
                   "both": {"linear_probe_top1": 76.07, "fid": 10.36, "isc": 84.33},
                   "encoder": {"linear_probe_top1": 76.11, "fid": 10.35, "isc": 86.71}},
          "labels": {"none": "Rec. only", "decoder": "Rec. + DC", "both": "Rec. + DC + EC",
                     "encoder": "Rec. + EC (LEASE)"}},
}

# Evaluation set names (`evaluate.datasets[].name`) as the paper's columns: lower-cased, with '_' and ' '
# read as '-'. ImageNet-C's severities are `imagenet-c-s4` / `imagenet-c-s5` (or a result's "severities").
DATASET_ALIASES = {
    "caltech": "caltech101", "caltech-101": "caltech101", "ucf": "ucf101", "ucf-101": "ucf101", "sun": "sun397",
    "sun-397": "sun397", "c100": "cifar100", "cifar-100": "cifar100", "c10": "cifar10", "cifar-10": "cifar10",
    "places": "places365", "places-365": "places365", "imagenetv2": "imagenet-v2", "inv2": "imagenet-v2",
    "in-v2": "imagenet-v2", "in-s": "imagenet-sketch", "sketch": "imagenet-sketch", "in-r": "imagenet-r",
    "imagenet-rendition": "imagenet-r", "in-a": "imagenet-a", "imagenet-adversarial": "imagenet-a",
    "objn": "objectnet", "object-net": "objectnet", "imagenet-c-4": "imagenet-c-s4", "imagenet-c-5": "imagenet-c-s5",
}


def paper_dataset(name: str) -> str:
    """The paper's column for an evaluation set's name (the name itself when the paper has no such column)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    return DATASET_ALIASES.get(key, key)
