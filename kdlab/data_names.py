"""The data sets kdlab loads by name: the one list that the recipe schema (kdlab.config), the loaders
(kdlab.data.load_dataset), the augmentation defaults and the CLI's choices read. A leaf module, with no
imports, so that `kdlab --help` stays fast."""

# the data sets of fixed content, each with its published training augmentation
FIXED = ("digits", "cifar10", "cifar100")
# ... and any folder of images by class
DATASETS = (*FIXED, "imagefolder")
