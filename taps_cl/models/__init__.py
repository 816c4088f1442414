"""The one model factory: a base built from its spec (`timm:NAME`, `torchvision:NAME`) and its
weights (`backbones`, `weights`), a task's model composed from the base and the task's stored
tensors (`compose`: a plain model for mergeable methods, the base with attached modules
otherwise), and exported task files written and read back without a registry (`files`)."""
