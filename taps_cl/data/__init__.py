"""Task data: a data spec (`imagefolder:`, `idx:`, `digits`, `torchvision:`) read from its source
(`sources`), split into train/validation/test and preprocessed for a base (`specs`), the one
class-stratified sampler every split and probe batch uses (`sampling`), and the rendered letters
data set the demo and benchmarks use (`letters`)."""
