"""Training and measuring models: `fit` (`fit_tied` for several models that share modules) is the
one training loop of every method, calling the method's hooks; `device` resolves where it runs,
`distributed` runs it over several processes under torchrun, `evaluate` measures accuracy and
logits."""
